"""The VAE (tokenizer) stage (:class:`VAEStage`, run by the loop every stage shares:
:mod:`unitok_jax.training.loop`) behind ``train.py --config configs/vae.py:...`` (:mod:`unitok_jax.cli.train`;
stages S0 and S1).

``train.objective`` s0: mel + adversarial + feature matching + KL, alternating generator / discriminator updates
(:mod:`unitok_jax.training.vae_step`); s1: semantic distillation of the decoder's semantic path to teacher features
read from disk (:mod:`unitok_jax.training.distill_step`). A workdir that already holds a checkpoint resumes it
exactly (params, optimizer states, step, RNG and the data position); SIGTERM saves a checkpoint and exits cleanly;
at the end the inference params are exported to ``DIR/export`` (a checkpoint ``sample.py`` loads).

One device mesh (``mesh_preset`` or ``mesh.*``, the tensor and expert axes folded into data: :func:`vae_mesh_sizes`;
several processes when the environment describes them, ``distributed``): the train state is created in its
shardings, the step is one jit with in/out shardings and donated state, every process loads its rows of each
global batch.

Monitoring: a progress bar (step, generator loss, step time, seconds of audio per second, MFU where the device's
peak is known); every ``log_every`` steps the step's metrics go to ``DIR/metrics.jsonl`` (one
``{"step": ..., metric: value}`` line) and TensorBoard (``DIR/tb``); every ``sample_every`` steps a fixed batch of
held-out clips (``data.heldout_manifest``, else fixed crops of training records) is reconstructed: mel L1, SI-SDR and
log-mel distance (``heldout/*``), plus reference / reconstruction audio and mel-spectrogram comparison images for
the first ``sample_audio`` clips in TensorBoard.
"""
from __future__ import annotations

import dataclasses
import sys

from unitok_jax.training.guard import NonFiniteError, SetupError  # noqa: F401  (raised by run)
from unitok_jax.training.loop import Stage, Step

OBJECTIVES = ("s0", "s1")


def vae_mesh_sizes(config) -> dict:
    """Mesh axis sizes of a VAE-stage config: ``mesh_preset`` (a key of ``unitok_jax.sharding.MESH_PRESETS``) or
    ``mesh.*``.

    The VAE has neither experts nor tensor-parallel layers, so the ``tensor`` and ``expert`` axes of the layout are
    folded into ``data`` (the devices stay busy on more batch rows instead of repeating the same work); params are
    FSDP-sharded over ``fsdp`` and the batch is split over ``data`` x ``fsdp``. E.g. the 8xH100 preset (fsdp 4,
    expert 2) becomes data 2 x fsdp 4."""
    from unitok_jax.configs import lm as lm_configs

    sizes = {a: int(v) for a, v in lm_configs.mesh_sizes(config).items()}
    fold = [sizes.get("tensor", 1), sizes.get("expert", 1)]
    if -1 in fold:  # "the rest of the devices" -> data takes the rest (data and fsdp are then explicit)
        sizes["data"] = -1
    elif sizes.get("data", 1) != -1:
        sizes["data"] = sizes.get("data", 1) * fold[0] * fold[1]
    sizes["tensor"] = sizes["expert"] = 1
    return sizes


def vae_objects(config, vcfg=None):
    """(VAEConfig, step config, DiscConfig or None, OptConfig) of a VAE-stage config: ``VAETrainConfig`` and the
    discriminators for objective s0, ``DistillConfig`` and no discriminator for s1. ``vcfg`` (e.g. the VAE config
    of ``init.vae``) replaces ``config.vae``."""
    from unitok_jax import vae
    from unitok_jax.training.discriminators import DiscConfig
    from unitok_jax.training.distill_step import DistillConfig
    from unitok_jax.training.vae_step import OptConfig, VAETrainConfig

    objective = config.train.get("objective", "s0")
    if objective not in OBJECTIVES:
        raise SetupError(f"train.objective={objective!r} is not one of {OBJECTIVES}")
    vcfg = vcfg or vae.VAEConfig.from_reference(config.vae.to_dict())
    schedule = config.train.get("lr_schedule", "constant")
    if schedule not in ("constant", "cosine"):
        raise SetupError(f"train.lr_schedule={schedule!r} is not 'constant' or 'cosine'")
    ocfg = OptConfig(lr=config.train.lr, decay_steps=config.train.steps if schedule == "cosine" else 0,
                     final_lr_ratio=config.train.get("lr_final_ratio", 0.1))
    if objective == "s1":
        return vcfg, DistillConfig(vae=vcfg), None, ocfg
    tcfg = VAETrainConfig(vae=vcfg, gan_loss=config.train.gan_loss, noise_tau=config.train.noise_tau,
                          adv_start_step=config.train.adv_start_step)
    dcfg = DiscConfig.tiny() if config.train.tiny_discriminators else DiscConfig()
    return vcfg, tcfg, dcfg, ocfg


def vae_init_fn(config, objects=None):
    """``init(key, params=None) -> train state`` (``jax.eval_shape`` it for the abstract state, jit it with
    out_shardings to create it sharded). ``params``: VAE params to start from (``init.vae``), else random."""
    import jax

    from unitok_jax import vae
    from unitok_jax.training.distill_step import DistillConfig, init_distill_state
    from unitok_jax.training.vae_step import init_vae_train_state

    vcfg, tcfg, dcfg, ocfg = objects or vae_objects(config)

    def init(key, params=None):
        k_init, k_state = jax.random.split(key)
        params = vae.init_params(vcfg, k_init) if params is None else params
        if isinstance(tcfg, DistillConfig):
            return init_distill_state(tcfg, params, ocfg, k_state)
        return init_vae_train_state(tcfg, params, dcfg, ocfg, k_state)

    return init


def vae_state_shardings(state_abs: dict, tcfg, ocfg, mesh) -> dict:
    """Shardings of a VAE train state: generator and discriminator params FSDP-sharded over ``fsdp`` where a leaf is
    big enough (:func:`unitok_jax.training.sharded.fsdp_spec`; replicated otherwise, so with fsdp = 1 the state is
    plain data parallel), Adam moments like their params, counters / step / RNG replicated."""
    import jax
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from unitok_jax.training import sharded
    from unitok_jax.training.vae_step import disc_optimizer, gen_optimizer

    rep = NamedSharding(mesh, P())

    def params(tree):
        return jax.tree.map(lambda x: NamedSharding(mesh, sharded.fsdp_spec(x.shape, mesh, stacked=True)), tree)

    def opt_state(opt, state, param_sh):
        out = optax.tree_map_params(opt, lambda x, s: x if isinstance(x, optax.MaskedNode) else s, state, param_sh,
                                    transform_non_params=lambda _: rep,
                                    is_leaf=lambda x: isinstance(x, optax.MaskedNode))
        return jax.tree.map(lambda x: rep if x is None else x, out,
                            is_leaf=lambda x: x is None or isinstance(x, NamedSharding))

    gen = params(state_abs["gen_params"])
    out = {"step": rep, "gen_params": gen,
           "gen_opt_state": opt_state(gen_optimizer(tcfg, ocfg), state_abs["gen_opt_state"], gen),
           "rng": rep, "num_skipped": rep}
    if "disc_params" in state_abs:  # objective s0
        disc = params(state_abs["disc_params"])
        out.update(disc_params=disc,
                   disc_opt_state=opt_state(disc_optimizer(ocfg), state_abs["disc_opt_state"], disc))
    return out


def vae_step_fn(tcfg, dcfg, ocfg, state_sh, mesh, gan: bool = True):
    """The VAE train step ``(state, {"wave", "lengths"[, "teacher", "teacher_frames"]}) -> (state, metrics)`` as
    one jit with in/out shardings (state in ``state_sh``, batch split over data x fsdp, metrics replicated) and
    donated state, traced under the mesh and the logical rules (the backbones' activations are batch-sharded by the
    same rules). S0's GAN step (``gan`` False: its mel + KL step without the discriminators, for the steps before
    ``adv_start_step``) or S1's distillation step, after the type of ``tcfg``."""
    import functools

    from unitok_jax import sharding as shd
    from unitok_jax.training import sharded
    from unitok_jax.training.distill_step import DistillConfig, distill_train_step
    from unitok_jax.training.vae_step import vae_train_step

    if isinstance(tcfg, DistillConfig):
        step = functools.partial(distill_train_step, cfg=tcfg, opt_cfg=ocfg)
    else:
        step = functools.partial(vae_train_step, cfg=tcfg, disc_cfg=dcfg, opt_cfg=ocfg, gan=gan)
    return sharded.jit_step(step, state_sh, mesh, shd.DEFAULT_RULES)


def heldout_batch(config, train_records, sample_rate: int = 16000, hop: int = 320, teacher_dim: int = 0):
    """The fixed batch the VAE stage reconstructs every ``sample_every`` steps: ``data.heldout_size`` records spread
    evenly over ``data.heldout_manifest`` (else over the training manifest: then the clips are *not* held out),
    each centre-cropped to ``data.heldout_seconds`` (rounded to whole frames). Unreadable records are skipped.
    Returns ({"wave" [N, L] f32, "lengths" [N] i32, "ids"}, a line describing the source), or (None, reason).

    ``teacher_dim`` > 0 (objective s1): the crops start on a frame boundary and the batch also holds the matching
    teacher rows (``"teacher" [N, L / hop, dim]``, ``"teacher_frames" [N]``); records without readable teacher
    features (field ``data.teacher_key``) are skipped."""
    import numpy as np

    from unitok_jax.audio import AudioError, load_audio
    from unitok_jax.data.manifest import read_manifest, spread_order
    from unitok_jax.data.pipeline import TeacherError, load_teacher, teacher_rows

    if config.data.heldout_manifest:
        records = read_manifest(config.data.heldout_manifest, require_text=False).records
        source = f"held-out manifest {config.data.heldout_manifest}"
    else:
        records = list(train_records)
        source = "training manifest (no data.heldout_manifest: fixed crops of training records, not held out)"
    n = int(config.data.heldout_size)
    length = max(hop, int(round(config.data.heldout_seconds * sample_rate / hop)) * hop)
    if n < 1 or not records:
        return None, f"no held-out clips ({source}: {len(records)} records, heldout_size={n})"
    order = spread_order(len(records), n)
    waves, lengths, ids, teachers = [], [], [], []
    frames = length // hop
    for i in order:
        if len(waves) == n:
            break
        try:
            w = load_audio(records[i]["audio"], sample_rate)
            if teacher_dim:
                feats = load_teacher(records[i].get(config.data.teacher_key) or "", teacher_dim)
        except (AudioError, TeacherError):
            continue
        if w.size == 0:
            continue
        start = max((len(w) - length) // 2, 0)
        if teacher_dim:
            start = start // hop * hop
            rows = teacher_rows(feats, start // hop, frames)
            if rows is None:
                continue
            teachers.append(rows)
        piece = w[start : start + length]
        waves.append(np.pad(piece, (0, length - len(piece))).astype(np.float32))
        lengths.append(len(piece))
        ids.append(str(records[i].get("id", i)))
    if not waves:
        return None, f"no readable held-out clips in the {source}"
    batch = {"wave": np.stack(waves), "lengths": np.asarray(lengths, np.int32), "ids": ids}
    if teacher_dim:
        batch["teacher"] = np.stack([t for t, _ in teachers])
        batch["teacher_frames"] = np.asarray([k for _, k in teachers], np.int32)
    return batch, f"{len(waves)} clips of {length / sample_rate:.2f} s from the {source}"


def heldout_metrics(ref, rec, lengths, sample_rate: int = 16000) -> dict:
    """Mean SI-SDR (dB) and log-mel L1 distance (:mod:`unitok_jax.eval.metrics`) over the clips (host numpy)."""
    import numpy as np

    from unitok_jax.eval import metrics as em

    sdr, lmd = [], []
    for r, x, n in zip(ref, rec, lengths):
        r, x = np.asarray(r[:n], np.float64), np.asarray(x[:n], np.float64)
        sdr.append(em.si_sdr(r, x))
        lmd.append(em.log_mel_distance(r, x, sample_rate))
    return {"heldout/si_sdr": float(np.mean(sdr)), "heldout/log_mel_dist": float(np.mean(lmd))}


class VAEStage(Stage):
    """The VAE stage for :func:`unitok_jax.training.loop.run` (``data=False``: model, mesh and abstract state only,
    for an export)."""

    name = "vae"
    units = "audio_s_per_s"
    skipped_metric = "skipped"

    def __init__(self, config, workdir: str, *, data: bool = True):
        import jax

        from unitok_jax import sharding as shd
        from unitok_jax.convert import ConversionError, load, read_vae_config
        from unitok_jax.training import sharded
        from unitok_jax.training.distill_step import DistillConfig
        from unitok_jax.training.loop import stage_mesh

        super().__init__(config, workdir, data=data)
        dev = jax.devices()[0]  # float32 matmuls run as TF32 on NVIDIA tensor cores, as bf16 passes on TPU
        self.compute_dtype = "bfloat16" if dev.platform == "tpu" else "tfloat32"
        self.records = self.read_manifest("manifest", "{id, audio, speaker}", require_text=False) if data else []
        init_params, init_vcfg = None, None
        if config.get("init") and config.init.get("vae"):
            try:
                if data:
                    init_vcfg, init_params = load(config.init.vae).vae()
                else:  # an export needs the config only
                    init_vcfg = read_vae_config(config.init.vae)
            except (ConversionError, KeyError, ValueError) as e:
                raise SetupError(f"init.vae={config.init.vae}: {e}") from None
            if data:
                self.say(f"starting from the VAE in {config.init.vae} (its config replaces `vae`)")
        self.objects = vae_objects(config, init_vcfg)
        self.vcfg, self.tcfg, self.dcfg, self.ocfg = self.objects
        self.distill = isinstance(self.tcfg, DistillConfig)  # objective s1
        self.teacher_dim = self.vcfg.unified_dim if self.distill else 0
        if data and self.distill:
            self._check_teacher(init_params is None)

        # ---- mesh + sharded state (born sharded, or restored into its shardings)
        self.mesh = stage_mesh(vae_mesh_sizes(config), data=data)
        self.rules = shd.DEFAULT_RULES
        gb = config.data.batch_size
        if data and (gb % sharded.batch_shards(self.mesh) or gb % self.nproc):
            raise SetupError(f"global batch {gb} is not divisible by the mesh's data x fsdp = "
                             f"{sharded.batch_shards(self.mesh)} and the {self.nproc} processes")
        self._init = vae_init_fn(config, self.objects)
        self._key = jax.random.key(config.seed)
        self.state_abs = jax.eval_shape(self._init, self._key)
        self.state_sh = vae_state_shardings(self.state_abs, self.tcfg, self.ocfg, self.mesh)
        self._init_params = init_params
        if data:
            self._setup_data()

    def _check_teacher(self, random_init: bool) -> None:
        """Objective s1: the teacher features must exist and have the semantic module's width (checked on one
        record)."""
        from unitok_jax.data.pipeline import TeacherError, load_teacher

        config, records = self.config, self.records
        key_name = config.data.teacher_key
        missing = [r.get("id", "?") for r in records if not isinstance(r.get(key_name), str)]
        if len(missing) == len(records):
            raise SetupError(f"objective s1 needs teacher features: no record of {config.data.manifest} has a "
                             f"{key_name!r} field (a .npy path; see data.teacher_key)")
        if missing:
            self.say(f"{len(missing)} records have no {key_name!r} field and are skipped (first: {missing[0]})",
                     file=sys.stderr)
        first = next(r for r in records if isinstance(r.get(key_name), str))
        try:
            load_teacher(first[key_name], self.teacher_dim)
        except TeacherError as e:
            raise SetupError(f"{e} (record {first.get('id', '?')}; the semantic module emits {self.teacher_dim} "
                             f"channels)") from None
        if random_init:
            self.say("warning: objective s1 without init.vae distils into a randomly initialised (untrained) "
                     "encoder", file=sys.stderr)

    def _setup_data(self) -> None:
        import jax

        from unitok_jax.data.pipeline import vae_batches

        config = self.config
        self.data = vae_batches(self.records, batch_size=config.data.batch_size // self.nproc,
                                crop_seconds=config.data.crop_seconds, seed=config.seed,
                                teacher_key=config.data.teacher_key if self.distill else None,
                                teacher_dim=self.teacher_dim, hop=self.vcfg.hop)  # this process's rows
        self.batch_keys = ("wave", "lengths") + (("teacher", "teacher_frames") if self.distill else ())
        self.it = iter(self.data)
        self.step_fn = vae_step_fn(self.tcfg, self.dcfg, self.ocfg, self.state_sh, self.mesh)
        # the steps before adv_start_step run without the discriminators (a second program, compiled when used)
        self.gan_from = getattr(self.tcfg, "adv_start_step", 0)
        self.warm_fn = (vae_step_fn(self.tcfg, self.dcfg, self.ocfg, self.state_sh, self.mesh, gan=False)
                        if self.gan_from > 0 else self.step_fn)
        self.say(f"mesh {dict(self.mesh.shape)} over {jax.device_count()} devices ({self.nproc} processes); "
                 f"global batch {config.data.batch_size}")
        self.held, self.reconstruct = None, None
        if config.sample_every:
            self.held, why = heldout_batch(config, self.records, self.vcfg.sample_rate, self.vcfg.hop,
                                           self.teacher_dim)
            self.say(f"held-out samples: {why}")
        if self.held is not None:
            self._setup_heldout()
        self.sample_every = config.sample_every if self.held is not None else 0
        self._logged_refs: set = set()

    def _setup_heldout(self) -> None:
        """The held-out batch, replicated, and its jitted reconstruction (objective s1: the distillation loss)."""
        import jax
        from jax.sharding import NamedSharding, PartitionSpec as P

        from unitok_jax import vae
        from unitok_jax.training import vae_losses as L
        from unitok_jax.training.distill_step import distill_loss

        rep = NamedSharding(self.mesh, P())
        vcfg, tcfg = self.vcfg, self.tcfg

        def replicated(x):  # every process holds the whole held-out batch
            return jax.device_put(x, rep) if self.nproc == 1 else jax.make_array_from_process_local_data(rep, x)

        self.held_dev = tuple(replicated(self.held[k]) for k in self.batch_keys)

        def _reconstruct(gen_params, wave, lengths):
            enc = vae.encode(gen_params, vcfg, wave, lengths, sample=False)
            rec = L.mask_waveform(vae.decode(gen_params, vcfg, enc.latent, enc.frame_num)[:, : wave.shape[1]],
                                  lengths)
            return rec, L.multi_resolution_mel_loss(L.mask_waveform(wave, lengths), rec, lengths, tcfg.mel)

        def _distill(gen_params, wave, lengths, teacher, teacher_frames):  # objective s1: the posterior mean
            _, m = distill_loss(gen_params, dataclasses.replace(tcfg, sample_posterior=False), wave, lengths,
                                teacher, teacher_frames, None)
            return m["distill_mse"], m["distill_cos"]

        params_sh = self.state_sh["gen_params"]
        if self.distill:
            self.reconstruct = jax.jit(_distill, in_shardings=(params_sh,) + (rep,) * 4, out_shardings=(rep, rep))
        else:
            self.reconstruct = jax.jit(_reconstruct, in_shardings=(params_sh, rep, rep), out_shardings=(rep, rep))

    # ---- what the loop calls

    def init_state(self):
        import jax

        fixed = None if self._init_params is None else jax.device_put(self._init_params, self.state_sh["gen_params"])
        self._init_params = None
        return jax.jit(self._init, out_shardings=self.state_sh)(self._key, fixed)

    def data_state(self) -> dict:
        return {"speech": self.it.get_state(), "bad_records": self.bad_records}

    def set_data_state(self, saved: dict) -> None:
        self.it.set_state(saved.get("speech", saved))
        self.bad_records = int(saved.get("bad_records", 0))

    def next_step(self, step: int) -> Step:
        from unitok_jax.training import sharded

        local = next(self.it)
        self.bad_records += int((~local["ok"]).sum())
        batch = sharded.global_batch({k: local[k] for k in self.batch_keys}, self.mesh)
        units = float(local["lengths"].sum()) * self.nproc / self.vcfg.sample_rate
        return Step(self.warm_fn if step < self.gan_from else self.step_fn, batch, units, {})

    def evaluate(self, step: int, state, writer) -> dict:
        import jax
        import numpy as np

        from unitok_jax.training.monitor import mel_comparison

        if self.distill:
            mse, cos = self.reconstruct(state["gen_params"], *self.held_dev)
            return {"heldout/distill_mse": float(mse), "heldout/distill_cos": float(cos)}
        rec, mel = self.reconstruct(state["gen_params"], *self.held_dev)
        out = {"heldout/mel_l1": float(mel)}
        if jax.process_index() != 0:
            return out
        held, sr = self.held, self.vcfg.sample_rate
        rec = np.asarray(rec)
        out.update(heldout_metrics(held["wave"], rec, held["lengths"], sr))
        for i in range(min(int(self.config.sample_audio), len(rec))):
            n = int(held["lengths"][i])
            if i not in self._logged_refs:
                writer.audio(step, f"heldout/{i}/reference", held["wave"][i, :n], sr)
                self._logged_refs.add(i)
            writer.audio(step, f"heldout/{i}/reconstruction", rec[i, :n], sr)
            writer.image(step, f"heldout/{i}/mel", mel_comparison(held["wave"][i, :n], rec[i, :n], sr))
        return out

    def postfix(self, m: dict) -> dict:
        extra = {"mel": f"{m['mel']:.3f}"} if "mel" in m else {"cos": f"{m['distill_cos']:.3f}"}
        return {"loss": f"{m.get('loss_g', m.get('loss')):.3f}", **extra,
                "audio_s": f"{m['audio_s_per_s']:.1f}" if "audio_s_per_s" in m else "n/a"}

    def export(self, state, out: str, step: int) -> str:
        import jax

        from unitok_jax.convert import Checkpoint, save
        from unitok_jax.training import sharded

        host = sharded.to_host(state["gen_params"])
        if jax.process_index() == 0:
            save(Checkpoint({"vae": self.vcfg}, {"vae": host}, source=f"train.py vae, step {step}"), out,
                 overwrite=True)
        return f"inference params of step {step} in {out} (python sample.py reconstruct --checkpoint {out} ...)"

