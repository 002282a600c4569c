//! The library's modules form the layers lib.rs lists: a module imports only from its own
//! layer or lower ones, and no modules import each other in a ring.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// lib.rs's layers, lowest first.
const LAYERS: &[&[&str]] = &[
    &["fault", "rng", "fsio", "run_dir", "native", "device", "dist", "precision", "plot", "tensorboard"],
    &["data"],
    &["models"],
    &["loss", "perceptual", "ssim", "adversarial", "fid"],
    &["adam", "schedule", "ema"],
    &["config"],
    &["eval", "export"],
    &["train"],
    &["checkpoint"],
    &["pretrained"],
    &["metrics"],
    &["run"],
    &["bench"],
];

fn layer(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&module))
        .unwrap_or_else(|| panic!("module {module} is in no layer"))
}

/// Top-level module -> the top-level modules its files name as `crate::x`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = BTreeMap::new();
    let mut pending = vec![src.clone()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(&src).unwrap();
            let top = relative.components().next().unwrap().as_os_str().to_string_lossy();
            let module = top.trim_end_matches(".rs").to_string();
            if ["lib", "main", "cli"].contains(&module.as_str()) {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let used: &mut BTreeSet<String> = graph.entry(module.clone()).or_default();
            for (i, _) in text.match_indices("crate::") {
                let name: String =
                    text[i + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if !name.is_empty() && name != module && name != "LIBTORCH_VERSION" {
                    used.insert(name);
                }
            }
        }
    }
    graph
}

#[test]
fn every_import_points_down_the_layers() {
    let graph = imports();
    assert!(graph.len() >= 20, "found only {:?}", graph.keys());
    let mut upward = Vec::new();
    for (module, used) in &graph {
        for dep in used {
            if layer(dep) > layer(module) {
                upward.push(format!(
                    "{module} (layer {}) imports {dep} (layer {})",
                    layer(module),
                    layer(dep)
                ));
            }
        }
    }
    assert!(upward.is_empty(), "imports pointing up:\n{}", upward.join("\n"));
}

#[test]
fn no_modules_import_each_other_in_a_ring() {
    let graph = imports();
    // Depth-first search; a module met again while still on the path closes a ring.
    fn visit<'a>(
        m: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if let Some(i) = path.iter().position(|p| *p == m) {
            panic!("import ring: {} -> {m}", path[i..].join(" -> "));
        }
        if !done.insert(m) {
            return;
        }
        path.push(m);
        for dep in graph.get(m).into_iter().flatten() {
            visit(dep, graph, path, done);
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done);
    }
}
