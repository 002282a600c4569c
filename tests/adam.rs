//! Our tensor Adam against torch.optim.Adam's trajectory (fixture from scripts/adam_fixture.py).

use serde_json::Value;
use tch::{nn::VarStore, Device, Tensor};
use vae::adam::{Adam, AdamConfig};

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn assert_close(name: &str, got: &Tensor, expected: &[f32]) {
    let got = Vec::<f32>::try_from(got.flatten(0, -1)).unwrap();
    assert_eq!(got.len(), expected.len(), "{name}");
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!((g - e).abs() <= 1e-6 + 1e-5 * e.abs(), "{name}[{i}]: ours {g}, torch {e}");
    }
}

#[test]
fn matches_torch_optim_adam() {
    let fixture: Value = serde_json::from_str(include_str!("fixtures/adam.json")).unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let cfg: AdamConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let vs = VarStore::new(Device::Cpu);
        let mut params = Vec::new();
        for (name, p) in case["params"].as_object().unwrap() {
            let shape: Vec<i64> =
                p["shape"].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
            let init = Tensor::from_slice(&floats(&p["data"])).view(shape.as_slice());
            params.push((name.clone(), vs.root().var_copy(name, &init)));
        }
        let mut adam = Adam::new(&vs, cfg);
        for grads in case["grads"].as_array().unwrap() {
            adam.zero_grad();
            // d/dp sum(p * g) = g exactly: the backward pass plants the fixture's gradient.
            let surrogate: Tensor = params
                .iter()
                .map(|(name, p)| {
                    let g = Tensor::from_slice(&floats(&grads[name])).view(p.size().as_slice());
                    (p * g).sum(None)
                })
                .sum();
            surrogate.backward();
            adam.step();
        }
        assert_eq!(adam.step_count(), case["expected_step"].as_u64().unwrap());
        let state: std::collections::HashMap<String, Tensor> = adam.state().into_iter().collect();
        for (name, p) in &params {
            assert_close(name, p, &floats(&case["expected"][name]));
            assert_close(
                name,
                &state[&format!("optimizer.exp_avg.{name}")],
                &floats(&case["expected_exp_avg"][name]),
            );
            assert_close(
                name,
                &state[&format!("optimizer.exp_avg_sq.{name}")],
                &floats(&case["expected_exp_avg_sq"][name]),
            );
        }
    }
}
