//! `vae train`: a fresh or resumed trainer in a run folder it owns, and the run with its
//! interrupts.

use anyhow::{bail, ensure, Context, Result};
use clap::{ArgMatches, Args};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vae::checkpoint::{self, Checkpoint, Lineage, Resume};
use vae::config::{BestBy, Change, TrainArgs, TrainConfig};
use vae::data::{Fingerprint, Splits};
use vae::dist::{Backend, DistEnv, ProcessGroup};
use vae::models::ModelConfig;
use vae::pretrained;
use vae::run::{self, RunOptions};
use vae::run_dir::{self, RunDir};
use vae::schedule::LrSchedule;
use vae::train::Trainer;

/// Train a VAE; writes checkpoints and pictures into a run folder.
#[derive(Args)]
pub struct TrainCommand {
    #[command(flatten)]
    pub settings: TrainArgs,
    #[command(flatten)]
    pub run: RunOptions,
}

/// What a run starts from, and where it goes (rank 0's folder; the other ranks write nothing).
struct Start {
    trainer: Trainer,
    splits: Splits,
    folder: Option<RunDir>,
    lineage: Lineage,
}

impl TrainCommand {
    pub fn run(mut self, matches: &ArgMatches) -> Result<()> {
        self.run.validate()?;
        let var = |name: &str| std::env::var(name).ok();
        let env = DistEnv::from_vars(var)?;
        let mut device = self.settings.device.init()?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if let Some(threads) =
            vae::dist::srun_threads(var, cores).filter(|_| self.settings.device.threads.is_none())
        {
            tch::set_num_threads(threads);
        }
        let backend = self.run.dist_backend.unwrap_or(Backend::for_device(device));
        let nproc = self.run.nproc;
        match &env {
            None if nproc > 1 => {
                // Refused here, before any rank starts, when this build or device cannot run it.
                backend.check(device)?;
                let gpus = tch::Cuda::device_count() as usize;
                ensure!(
                    backend != Backend::Nccl || nproc <= gpus,
                    "--nproc {nproc} on CUDA takes a GPU per rank, and this machine has {gpus}"
                );
                return super::launch::ranks(nproc);
            }
            None => {
                if let Some(tasks) = vae::dist::slurm_tasks_outside_srun(var) {
                    vae::note!(
                        "note: this SLURM job has {tasks} tasks (SLURM_NTASKS), but this process was not \
                         started by srun, so it trains alone; for {tasks} ranks start it with srun, or \
                         give --nproc {tasks}"
                    );
                }
            }
            // Our own launcher's ranks carry its --nproc; another launcher's count is the one.
            Some(env) => ensure!(
                nproc == 1 || nproc == env.world,
                "--nproc {nproc} in a run whose launcher (torchrun or srun) started {} ranks: the \
                 launcher starts them; drop --nproc",
                env.world
            ),
        }
        if let (Some(env), tch::Device::Cuda(_)) = (&env, device) {
            // One GPU per local rank, unless --device named one.
            if !self.settings.device.device.starts_with("cuda:") {
                device = tch::Device::Cuda(env.gpu(tch::Cuda::device_count() as usize)?);
            }
        }
        // A backend named on one process forms a group of one: the path of a W-rank run.
        let env = env.or_else(|| self.run.dist_backend.map(|_| DistEnv::alone()));
        let timeout = std::time::Duration::from_secs(self.run.dist_timeout);
        let group = match env {
            Some(env) => Some(ProcessGroup::connect(&env, backend, device, timeout)?),
            None => None,
        };
        // One rank reports; all of them see the same numbers.
        self.run.quiet |= group.as_ref().is_some_and(|g| g.rank > 0);
        let start = match self.resume_from(group.as_ref())? {
            Some(from) => match self.resumed(matches, &from, device, group.as_ref())? {
                Some(start) => start,
                None => return Ok(()),
            },
            None => self.fresh(matches, device, group.as_ref())?,
        };
        let Start { mut trainer, splits, folder, lineage } = start;
        trainer.group = group;
        if let Some(group) = &trainer.group {
            check_same_settings(group, &trainer.cfg)?;
        }
        trainer.share_weights()?;
        self.run.stop = Some(install_stop_handler()?);
        let summary = run::run(&mut trainer, &splits, folder.as_ref(), &lineage, &self.run)?;
        if summary.interrupted {
            // No rank exits before rank 0 has written the checkpoint: launchers stop the rest
            // of a run once one rank exits non-zero (torchrun kills them 30 s on, srun
            // --kill-on-bad-exit at once), which would cut a long write short.
            if let Some(group) = &trainer.group {
                vae::fault::in_stop();
                vae::dist::rank_0_done(group, "vae/stop-saved", "write the checkpoint")?;
                // Then all meet, so rank 0 (which may serve the store) exits only once the
                // others have read that.
                group.barrier()?;
            }
            if let Some(folder) = &folder {
                let again = if self.run.auto_resume { "the same command (--auto-resume), or " } else { "" };
                let owed = if summary.in_evaluation { " as its test evaluation began (owed)" } else { "" };
                vae::note!(
                    "interrupted: saved {} at epoch {}, step {}{owed}\nresume with: {again}vae train --resume {}",
                    folder.last().display(),
                    trainer.epoch,
                    trainer.step,
                    folder.path().display()
                );
            }
            drop(folder);
            std::process::exit(INTERRUPTED);
        }
        if let (false, Some(folder), Some((_, test))) = (self.run.quiet, &folder, summary.epochs.last()) {
            let by = trainer.cfg.best_by;
            let best = match (by, trainer.best) {
                (BestBy::Loss, _) | (_, None) => String::new(),
                (by, Some(best)) => format!(", best test {} {best:.4} (best.safetensors)", by.name()),
            };
            vae::say!(
                "done: test loss {:.2} {}{best}; checkpoints and pictures in {}",
                test.loss,
                trainer.cfg.model.likelihood().unit(),
                folder.path().display()
            );
        }
        Ok(())
    }

    /// The checkpoint the run continues: `--resume`'s, or with `--auto-resume` the run
    /// folder's when it holds one (every rank must see the same).
    fn resume_from(&self, group: Option<&ProcessGroup>) -> Result<Option<PathBuf>> {
        let Some(out) = self.run.out.as_ref().filter(|_| self.run.auto_resume) else {
            return Ok(self.run.resume.clone());
        };
        let last = out.join(run_dir::LAST);
        let found = last.is_file();
        if let Some(group) = group {
            let seeing = vae::dist::ranks_saying(group, found)?;
            ensure!(
                seeing == 0 || seeing == group.world,
                "--auto-resume: {seeing} of {} ranks find a checkpoint in --out, rank {} {} {}; the ranks \
                 must share the run folder (one file system)",
                group.world,
                group.rank,
                if found { "finds" } else { "finds none at" },
                last.display()
            );
        }
        if found && !self.run.quiet {
            vae::say!("--auto-resume: continuing the run in {} from {}", out.display(), run_dir::LAST);
        }
        Ok(found.then_some(last))
    }

    /// A new run: settings checked, data loaded, then a run folder of its own (rank 0's).
    fn fresh(
        &self,
        matches: &ArgMatches,
        device: tch::Device,
        group: Option<&ProcessGroup>,
    ) -> Result<Start> {
        let rank = group.map_or(0, |g| g.rank);
        let mut args = self.settings.clone();
        TrainArgs::check_arch_flags(matches, args.arch)?;
        args.data.check_flags(matches)?;
        // The weights' image shape where the flags leave it open, as `vae eval` takes it.
        let from = match &self.run.init_from {
            Some(from) => {
                let theirs = pretrained::architecture_of(from)?;
                let [channels, side, _] = theirs.image_shape();
                args.data.fit_to_weights([channels, side], from)?;
                Some((from, theirs))
            }
            None => None,
        };
        let mut cfg = args.config();
        if let Some((from, theirs)) = from {
            cfg.model = init_architecture(from, theirs, &cfg.model, matches)?;
            cfg.beta = args.beta.unwrap_or(cfg.model.arch().default_beta());
        }
        cfg.validate()?;
        cfg.precision.check_device(device)?;
        // Judged before the data, which may take long to load, and again once held.
        let verdict = match (rank, &self.run.out) {
            (0, Some(dir)) => run_dir::check_not_in_use(dir)
                .and_then(|()| check_takes_new_run(dir))
                .and_then(|()| check_outside_data(dir, &cfg.data)),
            (0, None) => check_outside_data(Path::new(DEFAULT_RUNS), &cfg.data),
            _ => Ok(()),
        };
        shared(group, verdict)?;
        let (splits, data) = load_data(&cfg.data, cfg.seed, group, self.run.quiet)?;
        let [c, h, _] = splits.train.image_shape();
        cfg.model.set_image_shape(c, h);
        let trainer = Trainer::new(cfg, device)?;
        let init_from = match &self.run.init_from {
            Some(from) => {
                let (origin, averaged) = pretrained::init_from(from, &trainer.vs, &trainer.cfg.model)?;
                if rank == 0 && !self.run.quiet {
                    let which = if averaged { "the moving average of " } else { "" };
                    vae::say!("starting from {which}the weights of {} (a fresh optimizer)", from.display());
                }
                Some(origin)
            }
            None => None,
        };
        if trainer.cfg.freeze_encoder && init_from.is_none() && rank == 0 {
            vae::note!("warning: --freeze-encoder without --init-from keeps the encoder at its random initialisation");
        }
        let run_id = checkpoint::new_run_id(trainer.cfg.seed);
        let lineage = Lineage { run_id, history: Vec::new(), init_from, data: Some(data) };
        if rank > 0 {
            return Ok(Start { trainer, splits, folder: None, lineage });
        }
        let folder = match &self.run.out {
            Some(dir) => RunDir::open(dir)?,
            None => RunDir::open_new(Path::new(DEFAULT_RUNS), trainer.cfg.data.name())?,
        };
        check_takes_new_run(folder.path())?;
        Ok(Start { trainer, splits, folder: Some(folder), lineage })
    }

    /// A checkpoint's run continued, with the knobs the command line changes; `None` when it
    /// has already completed its epochs.
    fn resumed(
        &self,
        matches: &ArgMatches,
        from: &Path,
        device: tch::Device,
        group: Option<&ProcessGroup>,
    ) -> Result<Option<Start>> {
        let (rank, world) = group.map_or((0, 1), |g| (g.rank, g.world));
        ensure!(
            vae::pretrained::diffusers_folder(from).is_none(),
            "--resume {0}: an autoencoder's weights (a diffusers folder, or a single Stable Diffusion VAE \
             file), not a run to continue; start a run from them with --init-from {0}",
            from.display()
        );
        let path = run_dir::resolve(from)?;
        let ckpt = Checkpoint::load(&path)?;
        TrainArgs::check_arch_flags(matches, ckpt.meta.config.model.arch())?;
        let (cfg, mut changes) = self.settings.resumed(&ckpt.meta.config, matches, &path)?;
        ensure!(
            cfg.epochs >= ckpt.meta.epoch,
            "--epochs {} is below the {} epochs {} has already completed",
            cfg.epochs,
            ckpt.meta.epoch,
            path.display()
        );
        ensure!(
            cfg.max_steps == 0 || cfg.max_steps >= ckpt.meta.step,
            "--max-steps {} is below the {} steps {} has already taken",
            cfg.max_steps,
            ckpt.meta.step,
            path.display()
        );
        cfg.validate()?;
        cfg.precision.check_device(device)?;
        let home = run_dir::folder_of(&path);
        let out_dir = self.run.out.clone().unwrap_or_else(|| home.clone());
        // Everything that can be wrong with the checkpoint shows before the folder is touched.
        let mut trainer = ckpt.trainer(cfg, device)?;
        // The files may move (Process settings); what they hold is part of the loss (LPIPS) and
        // of the test figures (both): other weights, other numbers.
        let weights = [
            (
                "--lpips-weights",
                ckpt.meta.lpips_crc32,
                trainer.lpips.as_ref().map(|l| l.checksum),
                BestBy::Lpips,
            ),
            ("--fid-weights", ckpt.meta.fid_crc32, trainer.fid.as_ref().map(|f| f.checksum), BestBy::Rfid),
        ];
        let mut remeasured = false;
        for (flag, was, now, figure) in weights {
            if let (Some(was), Some(now)) = (was, now) {
                if was != now {
                    let (was, now) = (format!("crc32 {was:08x}"), format!("crc32 {now:08x}"));
                    changes.push(Change { flag: format!("{flag} (contents)"), was, now });
                    // A best measured by other weights is no measure (as with a change of --best-by).
                    if trainer.cfg.best_by == figure {
                        (trainer.best, trainer.evaluations_since_best) = (None, 0);
                        remeasured = true;
                    }
                }
            }
        }
        // Finished: nothing left to train and no evaluation owed.
        if trainer.finished() {
            let dir = out_dir.display();
            let cfg = &trainer.cfg;
            if trainer.epoch >= cfg.epochs {
                vae::say!(
                    "the run in {dir} has completed its {} epochs; pass --epochs N to train further",
                    cfg.epochs
                );
            } else if cfg.reached_max_steps(trainer.step) {
                vae::say!(
                    "the run in {dir} has taken its --max-steps {}; pass a larger --max-steps (0: none) to train further",
                    cfg.max_steps
                );
            } else {
                vae::say!(
                    "the run in {dir} stopped early: its test {} has not bettered for {} evaluation(s) \
                     (--patience {}); pass a larger --patience (0: none) to train further",
                    cfg.best_by.name(),
                    trainer.evaluations_since_best,
                    cfg.patience
                );
            }
            return Ok(None);
        }
        // Judged before the data, which may take long to load, and again once held.
        let verdict = match rank {
            0 => run_dir::check_not_in_use(&out_dir)
                .and_then(|()| check_folder_takes(&out_dir, &ckpt))
                .and_then(|()| check_outside_data(&out_dir, &trainer.cfg.data)),
            _ => Ok(()),
        };
        shared(group, verdict)?;
        let (splits, data) = load_data(&trainer.cfg.data, trainer.cfg.seed, group, self.run.quiet)?;
        let mut lineage = ckpt.meta.lineage();
        // Other images than the run trained on (files added to or gone from a folder, --data-dir
        // naming another copy): it goes on with them, as with other LPIPS weights, but says so,
        // keeps it in the history, and judges its best afresh, on these test images.
        let data_changed = lineage.data.filter(|was| *was != data);
        if let Some(was) = data_changed {
            changes.push(Change { flag: DATA_CHANGE.into(), was: was.to_string(), now: data.to_string() });
            (trainer.best, trainer.evaluations_since_best) = (None, 0);
        }
        lineage.data = Some(data);
        if rank > 0 {
            return Ok(Some(Start { trainer, splits, folder: None, lineage }));
        }
        let folder = RunDir::open(&out_dir)?;
        check_folder_takes(folder.path(), &ckpt)?;
        let moved = !same_file(folder.path(), &home);
        if moved || !changes.is_empty() {
            let from_run = moved.then(|| ckpt.meta.run_id.clone());
            if moved {
                lineage.run_id = checkpoint::new_run_id(trainer.cfg.seed);
            }
            lineage.history.push(Resume {
                epoch: ckpt.meta.epoch,
                step: ckpt.meta.step,
                from_run,
                changes: changes.clone(),
            });
        }
        if let Some(was) = data_changed {
            vae::note!(
                "warning: the {} images differ from those the run trained on ({was} then, {data} now): it \
                 goes on with these, no longer as it would have, and judges its best {} afresh on their test split",
                trainer.cfg.data.name(),
                trainer.cfg.best_by.name()
            );
        }
        if !self.run.quiet {
            report_changes(&changes, &trainer.cfg);
            if remeasured {
                vae::note!(
                    "best.safetensors: the test {} is now measured with other weights, so the next \
                     evaluation's figure is the best to beat",
                    trainer.cfg.best_by.name()
                );
            }
            if ckpt.meta.world_size != world {
                vae::note!(
                    "resuming a run of {} rank(s) on {world}: the gradients are summed in another order, so the \
                     run is no longer bitwise the same as an uninterrupted one",
                    ckpt.meta.world_size
                );
            }
            let parts = |c: &TrainConfig, world: usize| c.grad_accum * world;
            let (before, now) = (parts(&ckpt.meta.config, ckpt.meta.world_size), parts(&trainer.cfg, world));
            if trainer.cfg.disc_weight > 0.0 && before != now {
                vae::note!(
                    "the discriminator now sees each batch as {now} part(s) (ranks x --grad-accum), not {before}: \
                     its BatchNorm statistics and adaptive weight are each part's, so its steps change"
                );
            }
        }
        Ok(Some(Start { trainer, splits, folder: Some(folder), lineage }))
    }
}

/// `theirs`, the architecture of the weights at `from` (`--init-from`), with the flags' image
/// shape and loss; architecture flags given on the command line must describe the same model.
fn init_architecture(
    from: &Path,
    mut theirs: ModelConfig,
    flags: &ModelConfig,
    matches: &ArgMatches,
) -> Result<ModelConfig> {
    let [channels, side, _] = flags.image_shape();
    theirs.set_image_shape(channels, side);
    theirs.set_likelihood(flags.likelihood());
    let given = |arch| {
        TrainArgs::family_flags(arch)
            .iter()
            .chain(&["arch"])
            .any(|id| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
    };
    let likelihood_given = matches.value_source("likelihood") == Some(clap::parser::ValueSource::CommandLine);
    if !likelihood_given && theirs.arch() != flags.arch() {
        // The family's own default loss.
        theirs.set_likelihood(theirs.arch().default_config().likelihood());
    }
    ensure!(
        !given(flags.arch()) || &theirs == flags,
        "the flags describe {}, but {} holds {}; leave the architecture flags out to take its own",
        flags.summary(),
        from.display(),
        theirs.summary()
    );
    Ok(theirs)
}

/// The splits; in a data-parallel run rank 0 loads first (the others wait, [`vae::dist::rank_0_done`]),
/// so an image folder is decoded and cached once and the other ranks read the cache. With
/// their fingerprint, which every rank's must equal.
fn load_data(
    data: &vae::data::DataConfig,
    seed: u64,
    group: Option<&ProcessGroup>,
    quiet: bool,
) -> Result<(Splits, Fingerprint)> {
    let loaded = |group| vae::dist::rank_0_done(group, "vae/data-loaded", "load the data");
    let first = group.is_none_or(|g| g.rank == 0);
    if let (false, Some(group)) = (first, group) {
        loaded(group)?;
    }
    vae::fault::in_load();
    let splits = data.load(seed, quiet);
    let Some(group) = group else {
        let splits = splits?;
        let print = splits.fingerprint()?;
        return Ok((splits, print));
    };
    if first {
        // Also when loading failed, so the others do not wait for it in vain.
        loaded(group)?;
    }
    // Every rank must hold the same images: a node whose copy of the data differs (files
    // missing, another version) would take other steps per epoch than the rest, or train on
    // a mix. All ranks learn of a rank without data or with other data, and stop together.
    let failed = vae::dist::ranks_saying(group, splits.is_err())?;
    let splits = splits?;
    ensure!(failed == 0, "{failed} of {} ranks could not load the data (their errors say why)", group.world);
    let mine = splits.fingerprint()?;
    let (theirs, differing) = vae::dist::rank_0s(group, mine.to_values())?;
    let theirs = Fingerprint::from_values(theirs);
    ensure!(
        theirs == mine,
        "rank {} of {} holds other data than rank 0: {mine} here, {theirs} on rank 0; every rank must \
         read the same data (one shared folder, or identical copies on each machine)",
        group.rank,
        group.world
    );
    ensure!(
        differing == 0,
        "{differing} of {} ranks hold other data than rank 0 (their errors say how)",
        group.world
    );
    Ok((splits, mine))
}

/// Every rank must train the same run: a rank given other flags (multi-node torchrun is one
/// command typed per machine) or run by another vae would take its own Adam steps on the
/// same gradients, its weights drifting from rank 0's unseen, or fall out of step. Rank 0's
/// settings go to every rank; one that differs names the settings, and every rank stops.
/// Paths are left out: each machine may keep its files elsewhere (the data itself is compared
/// by content, in `load_data`).
fn check_same_settings(group: &ProcessGroup, cfg: &TrainConfig) -> Result<()> {
    let mut mine = serde_json::to_value(cfg)?;
    mine["vae"] = env!("CARGO_PKG_VERSION").into();
    for local in ["lpips_weights", "fid_weights", "gradient_checkpointing"] {
        mine.as_object_mut().expect("a config is an object").remove(local);
    }
    for local in ["data_dir", "cache_dir"] {
        mine["data"].as_object_mut().expect("data is an object").remove(local);
    }
    let theirs = vae::dist::rank_0s_bytes(group, &serde_json::to_vec(&mine)?)?;
    let theirs: serde_json::Value =
        serde_json::from_slice(&theirs).context("reading rank 0's settings (another vae?)")?;
    let differences = vae::config::json_differences(&mine, &theirs);
    let differing = vae::dist::ranks_saying(group, !differences.is_empty())?;
    let named: Vec<String> = differences
        .iter()
        .map(|(path, here, there)| format!("{path} {here} here, {there} on rank 0"))
        .collect();
    ensure!(
        named.is_empty(),
        "rank {} of {} runs other settings than rank 0: {}; every rank must run the same vae with \
         the same flags",
        group.rank,
        group.world,
        named.join(", ")
    );
    ensure!(
        differing == 0,
        "{differing} of {} ranks run other settings than rank 0 (their errors say which)",
        group.world
    );
    Ok(())
}

/// A run folder takes a checkpoint only of its own run, and never one behind its own
/// `last.safetensors`: either would overwrite another result.
fn check_folder_takes(dir: &Path, ckpt: &Checkpoint) -> Result<()> {
    check_can_be_folder(dir)?;
    let last = dir.join(run_dir::LAST);
    if !last.is_file() {
        // A checkpoint continued in its own folder: the files there are its run's.
        if same_file(dir, &run_dir::folder_of(&ckpt.path)) {
            return Ok(());
        }
        return check_holds_no_run(dir);
    }
    if same_file(&last, &ckpt.path) {
        return Ok(());
    }
    let here = match Checkpoint::load(&last) {
        Ok(here) => here,
        Err(e) => bail!(
            "{} holds {} that cannot be read ({e:#}); continuing there would overwrite it: pass --out NEW_FOLDER",
            dir.display(),
            last.display()
        ),
    };
    ensure!(
        here.meta.run_id == ckpt.meta.run_id,
        "{} belongs to another run than {} (run {} vs {}: another config, seed or history); continuing \
         there would overwrite its checkpoints and metrics: pass --out NEW_FOLDER",
        dir.display(),
        ckpt.path.display(),
        here.meta.run_id,
        ckpt.meta.run_id
    );
    ensure!(
        here.meta.step <= ckpt.meta.step,
        "{} holds a later checkpoint than {} (step {}); continuing here would overwrite it: pass --out NEW_FOLDER",
        last.display(),
        ckpt.path.display(),
        ckpt.meta.step
    );
    Ok(())
}

/// Where the run folders made without `--out` go (`checkpoints/<dataset>-<n>`).
const DEFAULT_RUNS: &str = "checkpoints";

/// Refuses a run folder `out` inside the image folder the run reads: its pictures would be
/// listed as training images, and each rewrite of them changes the listing (the images decoded
/// afresh at every start, each resume warned of other images).
fn check_outside_data(out: &Path, data: &vae::data::DataConfig) -> Result<()> {
    let (vae::data::DatasetKind::Folder, Some(images)) = (data.kind, &data.data_dir) else { return Ok(()) };
    ensure!(
        !vae::data::folder::lists(images, out)?,
        "run folder {} lies inside the image folder {} the run reads: its pictures would become training \
         images; choose a run folder elsewhere with --out",
        out.display(),
        images.display()
    );
    Ok(())
}

/// `--out` names a folder, or one that can be made: neither it nor a folder above it is a
/// file. Checked before the data loads, so the mistake costs no minutes of loading.
fn check_can_be_folder(dir: &Path) -> Result<()> {
    ensure!(!dir.is_file(), "--out {} is a file, not a run folder", dir.display());
    if let Some(file) = dir.ancestors().skip(1).find(|a| a.is_file()) {
        bail!("--out {} cannot be made: {} is a file, not a folder", dir.display(), file.display());
    }
    Ok(())
}

/// Rank 0's verdict on the run folder, made every rank's: the others stop with it at once
/// rather than wait for rank 0 until `--dist-timeout` (srun does not stop them).
fn shared(group: Option<&ProcessGroup>, verdict: Result<()>) -> Result<()> {
    let Some(group) = group else { return verdict };
    if vae::dist::ranks_saying(group, verdict.is_err())? > 0 {
        verdict?;
        bail!("rank 0 refused the run folder (its error says why), so rank {} stops too", group.rank);
    }
    verdict
}

/// A folder takes a new run only when it holds no checkpoint to continue and no other run's
/// files.
fn check_takes_new_run(dir: &Path) -> Result<()> {
    check_can_be_folder(dir)?;
    let last = dir.join(run_dir::LAST);
    ensure!(
        !last.exists(),
        "{} already holds a checkpoint ({}); continue it with --resume {0} or choose another --out{}",
        dir.display(),
        last.display(),
        restarted(|name| std::env::var(name).ok()).unwrap_or_default()
    );
    check_holds_no_run(dir)
}

/// Where a launcher started this command again (a requeued SLURM job, torchrun restarting its
/// ranks after a failure), what a run folder refused for its checkpoint should tell the user.
fn restarted(var: impl Fn(&str) -> Option<String>) -> Option<String> {
    let count = |name: &str| var(name).filter(|n| n.trim().parse::<u64>().is_ok_and(|n| n > 0));
    let (name, by) = [
        ("SLURM_RESTART_COUNT", "SLURM requeued this job"),
        ("TORCHELASTIC_RESTART_COUNT", "torchrun restarted its ranks"),
    ]
    .into_iter()
    .find_map(|(name, by)| count(name).map(|n| (format!("{name}={n}"), by)))?;
    Some(format!(". {by} ({name}): with --auto-resume, every start of the same command continues the run"))
}

/// A folder without `last.safetensors` takes a run only when it holds no run's files: the
/// checkpoints, metrics and pictures of a run whose `last.safetensors` is gone would be
/// overwritten.
fn check_holds_no_run(dir: &Path) -> Result<()> {
    let found = run_dir::run_files(dir)?;
    ensure!(
        found.is_empty(),
        "{} holds files of a run ({}) but no {}; a run there would overwrite them: choose another --out",
        dir.display(),
        found.join(", "),
        run_dir::LAST
    );
    Ok(())
}

/// The history's name for a resume on other images than the run's.
const DATA_CHANGE: &str = "the data";

/// Says which settings changed, when any change makes the run differ from an uninterrupted
/// one with the new settings: a longer run under a constant rate does not.
fn report_changes(changes: &[Change], cfg: &TrainConfig) {
    let longer = |c: &Change| c.flag == "--epochs" || c.flag == "--max-steps";
    let patience = |c: &Change| c.flag == "--patience";
    // Weights that only measure the test figures: the FID Inception's, LPIPS's without the term.
    let measuring = |c: &Change| {
        c.flag == "--fid-weights (contents)"
            || (c.flag == "--lpips-weights (contents)" && cfg.perceptual_weight == 0.0)
    };
    let picking = |c: &Change| c.flag == "--best-by";
    // Said in a warning of its own, quiet or not.
    let data = |c: &Change| c.flag == DATA_CHANGE;
    if let Some(c) = changes.iter().find(|c| picking(c)) {
        vae::note!(
            "best.safetensors is now picked by the test {}, not {}: the next evaluation's figure is the \
             best to beat",
            c.now,
            c.was
        );
    }
    // None of them changes a step.
    let harmless = |c: &Change| {
        (longer(c) && cfg.lr_schedule == LrSchedule::Constant) || picking(c) || patience(c) || measuring(c)
    };
    if changes.iter().all(|c| harmless(c) || data(c)) {
        return;
    }
    let list = changes.iter().filter(|c| !data(c)).map(|c| c.to_string()).collect::<Vec<_>>().join(", ");
    vae::note!(
        "resuming with changed settings: {list}; the run is no longer bitwise the same as an \
         uninterrupted one (the checkpoint's history keeps the change)"
    );
}

fn same_file(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// The signals that stop a run after its step with a checkpoint: Ctrl-C, SIGTERM (a kill,
/// a preemption, `scancel`), SIGUSR1 (SLURM's `--signal=USR1@SECONDS` before the time
/// limit) and SIGHUP (the terminal of the run is gone: an ssh connection dropped), whose
/// default actions would kill the process with no checkpoint; less those the process was
/// started with ignored, as Python leaves them: `nohup` ignores SIGHUP so that the run
/// outlives its terminal, a shell without job control SIGINT for `vae train &`, and a handler
/// would undo that.
pub fn stop_signals() -> impl Iterator<Item = i32> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
    [SIGINT, SIGTERM, SIGUSR1, SIGHUP].into_iter().filter(|&signal| !ignored(signal))
}

/// Whether `signal`'s action is to be ignored.
fn ignored(signal: i32) -> bool {
    // SAFETY: sigaction with no new action only reads the current one into `current`.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigaction(signal, std::ptr::null(), &mut current) == 0 && current.sa_sigaction == libc::SIG_IGN
    }
}

/// First stop signal: set the flag, so training stops after its step with a checkpoint.
/// A second Ctrl-C exits at once (the checkpoint on disk is always a complete one).
fn install_stop_handler() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in stop_signals() {
        let flag = Arc::clone(&stop);
        // SAFETY: the action only swaps an atomic and may call _exit, both async-signal-safe.
        unsafe {
            signal_hook_registry::register_sigaction(signal, move |info: &libc::siginfo_t| {
                if flag.swap(true, Ordering::SeqCst) && exits_at_once(signal, info.si_code) {
                    libc::_exit(INTERRUPTED);
                }
            })
        }?;
    }
    Ok(stop)
}

/// Whether a stop signal that comes after another ends the process at once: only a Ctrl-C
/// typed again (the terminal's, which the kernel sends). The same stop often arrives twice
/// without anyone asking twice: SLURM's SIGTERM at a time limit reaches every process of the
/// job, a `--nproc` rank's launcher included, which passes it on; torchrun's agent passes on
/// the terminal's Ctrl-C to ranks that had it from the terminal already. Exiting on those
/// would lose the checkpoint the first one asked for.
fn exits_at_once(signal: i32, si_code: i32) -> bool {
    signal == signal_hook::consts::SIGINT && si_code == libc::SI_KERNEL
}

/// Exit code of an interrupted run, as a shell reports death by SIGINT.
pub const INTERRUPTED: i32 = 130;

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use vae::config::{OnResume, SETTINGS};

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        train: TrainCommand,
    }

    #[test]
    fn a_restarted_command_is_told_of_auto_resume() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(restarted(vars(&[])), None);
        assert_eq!(
            restarted(vars(&[("SLURM_RESTART_COUNT", "0"), ("TORCHELASTIC_RESTART_COUNT", "0")])),
            None
        );
        let requeued = restarted(vars(&[("SLURM_RESTART_COUNT", "2")])).unwrap();
        assert!(
            requeued.contains("SLURM requeued this job (SLURM_RESTART_COUNT=2)")
                && requeued.contains("--auto-resume")
        );
        let torchrun = restarted(vars(&[("TORCHELASTIC_RESTART_COUNT", "1")])).unwrap();
        assert!(
            torchrun.contains("torchrun restarted its ranks (TORCHELASTIC_RESTART_COUNT=1)"),
            "{torchrun}"
        );
    }

    #[test]
    fn only_a_second_ctrl_c_from_the_terminal_exits_at_once() {
        use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
        assert!(exits_at_once(SIGINT, libc::SI_KERNEL));
        // kill(1), a launcher passing a signal on, a scheduler: a stop, asked again.
        assert!(!exits_at_once(SIGINT, libc::SI_USER));
        assert!(!exits_at_once(SIGTERM, libc::SI_USER));
        assert!(!exits_at_once(SIGTERM, libc::SI_KERNEL));
        assert!(!exits_at_once(SIGUSR1, libc::SI_USER));
    }

    /// Every flag of `vae train` says what a resumed run does with it: a setting of the run
    /// (config::SETTINGS), or an option of this process (run::RunOptions).
    #[test]
    fn every_train_flag_is_classified_for_resume() {
        let run_flags: Vec<String> = <RunOptions as clap::Args>::augment_args(clap::Command::new("run"))
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        let mut counts = [0; 3];
        for arg in Cli::command().get_arguments() {
            let id = arg.get_id().as_str();
            let class = match SETTINGS.iter().find(|s| s.id == id) {
                Some(s) => s.on_resume,
                None if run_flags.iter().any(|r| r == id) => OnResume::Process,
                None => panic!("--{id} is not classified: add it to config::SETTINGS or run::RunOptions"),
            };
            counts[class as usize] += 1;
        }
        assert!(counts.iter().all(|&n| n > 0), "fixed, changeable, process: {counts:?}");
    }
}
