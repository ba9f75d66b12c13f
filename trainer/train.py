"""The training loop. ``prepare`` builds everything (user errors surface here, before any step);
``Job.run`` trains. ``train(cfg)`` does both.

One optimizer step:
    this rank's micro-batches (batches.py: its own rows in mode dp, its shards of documents in
    modes cp and hdp) -> forward (layers run by the activation executor) -> chunked loss
    / global token count -> backward -> sum gradients over ranks -> the optimizer
    container clips and updates each sub-group on the tier holding its state (on one rank it may
    start during the last backward)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from longtrain.checkpoint import Checkpointer, SyncCheckpointer, TrainState
from longtrain.checkpoint.snapshot import SnapshotCheckpointer
from longtrain.offload import apply_activation_memory
from longtrain.optim import OptimizerContainer, build_scheduler
from longtrain.optim import build_optimizer as make_optimizer
from longtrain.parallel import (
    EngineCheckpointer,
    EngineOptimizer,
    Mesh,
    Sharding,
    Zero3Spec,
    all_reduce_sum,
    all_reduce_sums,
    apply_sharding,
    broadcast_object,
    init_mesh,
    shutdown,
)
from longtrain.trainer.data import (
    IGNORE_INDEX,
    PackedData,
    PackedLoader,
    PackedRows,
    Tokenizer,
    build_datasets,
    eval_batches,
    train_loader,
)

from .batches import (
    StepBatches,
    StepWork,
    Work,
    check_layout,
    hdp_cost_model,
    hdp_rows_per_step,
    probe_with_local_core,
)
from .compose import to_yaml
from .config import ConfigError, JobConfig
from .metrics import MetricsWriter, detect_peak_flops, model_flops_per_token, peak_memory_bytes
from .model.adapter import CausalLM, adapt
from .model.attention import build_attention_backend
from .model.hf import build_hf_model, head_dim_of
from .preemption import Preemption

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


TOKENIZER_PROBE = "The quick brown fox jumps over the lazy dog."


def check_tokenizer(cfg: JobConfig, tokenizer: Tokenizer) -> None:
    """A tokenizer must turn text into tokens. Given a model directory without tokenizer files
    (only config.json and weights), transformers builds one with a single token that encodes every
    text to nothing; training on its output would train on nothing."""
    if tokenizer.encode(TOKENIZER_PROBE):
        return
    spec = cfg.data.tokenizer
    is_model_dir = cfg.model.path is not None and Path(spec).resolve() == Path(cfg.model.path).resolve()
    where = f"data.tokenizer (= model.path {spec!r})" if is_model_dir else f"data.tokenizer={spec!r}"
    raise ConfigError(
        f"{where} encodes text to no tokens (a vocabulary of {tokenizer.vocab_size}, what transformers makes "
        "of a directory without tokenizer files); copy the model's tokenizer files (tokenizer.json, "
        "tokenizer_config.json) there or set data.tokenizer to a directory that has them"
    )


def check_loss_tokens(cfg: JobConfig, rows: PackedRows) -> None:
    """Packed rows must hold at least one target: a document's first token is never one, so
    documents of one token (after tokenization, bos and eos included) give none."""
    if bool((rows.labels != IGNORE_INDEX).any()):
        return
    source = f"data.path={cfg.data.path!r}" if cfg.data.path else f"data.source={cfg.data.source!r}"
    raise ConfigError(
        f"the training data has no loss tokens: the {rows.num_documents} documents of {source} are one "
        "token each with data.tokenizer, and a document's first token is never a target; use longer "
        "documents, data.add_eos=true or another data.tokenizer"
    )


def tokenize_once(cfg: JobConfig, mesh: Mesh) -> PackedData:
    """Rank 0 tokenizes and packs the documents, the other ranks receive its rows (or its error)."""
    result: PackedData | str | None = None
    if mesh.is_main:
        try:
            result = build_datasets(cfg.data, seq_len=cfg.train.seq_len, seed=cfg.seed)
            check_tokenizer(cfg, result.tokenizer)
            check_loss_tokens(cfg, result.train)
        except ConfigError as e:
            result = str(e)
    result = broadcast_object(result, mesh)
    if isinstance(result, str):
        raise ConfigError(result)
    assert result is not None
    return result


def build_data(cfg: JobConfig, mesh: Mesh) -> tuple[Tokenizer, PackedLoader, PackedRows | None]:
    """Tokenizer, this rank's training loader and the validation rows (``data.val_fraction > 0``).
    Mode hdp: every rank reads the whole global batch of a step (its position does not depend
    on the number of ranks)."""
    data = tokenize_once(cfg, mesh)
    if cfg.parallel.mode == "hdp":
        rows = hdp_rows_per_step(cfg)
        if len(data.train) < rows:
            raise ConfigError(
                f"only {len(data.train)} packed rows of train.seq_len={cfg.train.seq_len} tokens, fewer than the "
                f"{rows} of one step (train.global_batch_tokens, null = data.micro_batch_size x train.grad_accum "
                "rows); lower it or use more data (data.max_documents)"
            )
        loader = PackedLoader(data.train, rows, seed=cfg.seed, shuffle=cfg.data.shuffle)
    else:
        loader = train_loader(data, cfg.data, seed=cfg.seed, dp_rank=mesh.dp_rank, dp_world=mesh.dp_size)
    return data.tokenizer, loader, data.val


def param_dtype(cfg: JobConfig) -> torch.dtype:
    """The parameters' (and checkpoints') dtype: bf16 runs keep fp32 master weights and autocast;
    float64 is for exactness checks."""
    return torch.float64 if cfg.train.dtype == "float64" else torch.float32


def build_model(cfg: JobConfig, mesh: Mesh, vocab_size: int) -> CausalLM:
    """HF model (identically seeded on every rank) -> adapter -> activation-memory executor."""
    cfg.model.check_path()
    try:
        attention = build_attention_backend(cfg.model.attention, mesh.device)
    except ImportError as e:  # model.attention=flash_attn without the package
        raise ConfigError(
            f"model.attention={cfg.model.attention} needs the flash-attn package on CUDA ({e}); use auto or sdpa"
        ) from None
    torch.manual_seed(cfg.seed)
    hf_model = build_hf_model(
        cfg.model, vocab_size=vocab_size, seq_len=cfg.train.seq_len, dtype=param_dtype(cfg)
    )
    hf_config = cast("PreTrainedConfig", hf_model.config)  # nn.Module's __getattr__ says Tensor | Module
    if hf_config.vocab_size < vocab_size:
        raise ConfigError(
            f"model vocab_size {hf_config.vocab_size} is smaller than the tokenizer's {vocab_size}; "
            "raise model.vocab_size or use the model's own tokenizer (data.tokenizer)"
        )
    model = adapt(hf_model.to(mesh.device), attention)
    model.check_doc_len(cfg.train.seq_len, error=ConfigError)  # a packed row may be one document
    activation = cfg.activation
    if activation.file_dir is None:
        activation = dataclasses.replace(activation, file_dir=str(Path(cfg.output_dir) / "activation_swap"))
    # alpha=auto: each rank keeps what it resolves, so a resume computes the first run's floats
    record = Path(cfg.output_dir) / f"activation_alpha.rank{mesh.rank}.json"
    return apply_activation_memory(model, activation, alpha_record=record)


def build_optimizer(cfg: JobConfig, mesh: Mesh, model: CausalLM, sharding: Sharding):
    if sharding.optimizer is not None:  # an engine's own (parallel.shard=deepspeed)
        return sharding.optimizer, build_scheduler(sharding.optimizer, cfg.optim, cfg.train.steps)
    # With several ranks gradients are final only after their sync: no update during backward.
    optimizer = make_optimizer(
        model,
        cfg.optim,
        overlap_backward=not mesh.distributed,
        shards=sharding.shards,
    )
    return optimizer, build_scheduler(optimizer, cfg.optim, cfg.train.steps)


def architecture(model: CausalLM) -> dict[str, Any]:
    """What a checkpoint must match to be loaded (not run options such as model.attention)."""
    c = model.config
    return {
        "family": c.model_type,
        "hidden_size": c.hidden_size,
        "num_layers": c.num_hidden_layers,
        "num_heads": c.num_attention_heads,
        "num_kv_heads": c.num_key_value_heads,
        "intermediate_size": c.intermediate_size,
        "head_dim": head_dim_of(c),
        "vocab_size": c.vocab_size,
        "tie_embeddings": bool(c.tie_word_embeddings),
    }


def build_checkpointer(cfg: JobConfig, mesh: Mesh, model: CausalLM, sharding: Sharding) -> Checkpointer:
    """Disk checkpoints every checkpoint.every steps; with checkpoint.snapshot_every, in-memory
    snapshots in the snapshot agents between them."""
    disk = SyncCheckpointer(
        cfg.checkpoint, cfg.output_dir, mesh, architecture(model), sharded=sharding.sharded
    )
    if isinstance(sharding.optimizer, EngineOptimizer):  # parallel.shard=deepspeed over several ranks
        return EngineCheckpointer(disk, sharding.optimizer.engine, mesh)
    if cfg.checkpoint.snapshot_every is None:
        return disk
    return SnapshotCheckpointer(cfg.checkpoint, cfg.output_dir, mesh, architecture(model), disk)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float  # the learning rate this step's update used
    num_tokens: int  # loss tokens over all ranks and micro-batches
    seen_tokens: int  # all input positions of the global batch (padding included)
    model_flops: float  # over all ranks
    busy_s: list[float]  # per rank: seconds of its forwards and backwards
    stats: dict[str, float]  # the plan's figures (mode hdp)
    preempted: bool = False  # some rank got SIGTERM before this step's totals were summed

    def balance(self) -> dict[str, Any]:
        """Per-rank busy time and its imbalance (max / mean)."""
        mean = sum(self.busy_s) / len(self.busy_s)
        return {
            "busy_s": self.busy_s,
            "busy_max_s": max(self.busy_s),
            "busy_mean_s": mean,
            "imbalance": max(self.busy_s) / mean if mean > 0 else 1.0,
            **self.stats,
        }


@dataclass
class Job:
    cfg: JobConfig
    mesh: Mesh
    tokenizer: Tokenizer
    loader: PackedLoader
    batches: StepBatches
    model: CausalLM
    sharding: Sharding
    optimizer: OptimizerContainer
    scheduler: Any
    checkpointer: Checkpointer
    start_step: int
    val_rows: PackedRows | None = None
    preemption: Preemption = dataclasses.field(default_factory=Preemption)

    def autocast(self):
        if self.cfg.train.dtype == "bfloat16":
            return torch.autocast(self.mesh.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, step: StepWork) -> StepResult:
        """One optimizer step over this rank's micro-batches (token-weighted across ranks)."""
        mesh, model = self.mesh, self.sharding.forward or self.model  # an engine wraps the model
        num_tokens = step.num_tokens
        if num_tokens is None:
            num_tokens = int(all_reduce_sum(sum(w.shard.num_loss_tokens for w in step.work), mesh))
        loss_sum, flops = 0.0, 0.0
        busy_start = time.perf_counter()
        for i, work in enumerate(step.work):
            mb = work.shard.to(mesh.device, non_blocking=True)
            with self.autocast():
                out = model(
                    input_ids=mb.input_ids,
                    targets=mb.targets,
                    position_ids=mb.position_ids,
                    doc_spans=mb.doc_spans,
                    attention=mb.attention,
                    loss_normalizer=max(num_tokens, 1),
                )
            last = i == len(step.work) - 1
            if last:
                self.checkpointer.wait()  # a snapshot still copying the state finishes before it changes
                self.optimizer.before_last_backward()  # its gradients are final: updates may start
            self.sharding.grad_sync.before_backward(last)
            self.sharding.grad_sync.backward(out.loss)
            loss_sum += out.loss_sum.item()
            flops += self._flops(work)
        busy = time.perf_counter() - busy_start
        self.sharding.grad_sync.after_backward()
        lr = self.optimizer.param_groups[0]["lr"]  # before scheduler.step() moves it to the next step's
        grad_norm = self.optimizer.clip_and_step()  # clip to optim.grad_clip, update, drop the gradients
        self.scheduler.step()
        loss_sum, flops, busy_s, preempted = all_reduce_step_totals(
            loss_sum, flops, busy, self.preemption.requested, mesh
        )
        return StepResult(
            loss=loss_sum / max(num_tokens, 1),
            grad_norm=grad_norm,
            lr=lr,
            num_tokens=int(num_tokens),
            seen_tokens=self.batches.tokens_per_step,
            model_flops=flops,
            busy_s=busy_s,
            stats=step.stats,
            preempted=preempted,
        )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss per target token over the validation rows (all ranks; ``train.eval_batches`` each)."""
        assert self.val_rows is not None, "evaluate() needs validation rows (data.val_fraction > 0)"
        mesh, model = self.mesh, self.sharding.forward or self.model
        loss_sum = 0.0
        num_tokens: float = 0  # token counts are ints; all_reduce_sum below is typed to return a float
        for mb in eval_batches(  # whole rows on every rank, each its own (no context parallelism)
            self.val_rows,
            self.cfg.data.micro_batch_size,
            mesh.rank,
            mesh.world_size,
            self.cfg.train.eval_batches,
            equal_counts=mesh.distributed,  # a sharded forward is collective: every rank runs as many
        ):
            mb = mb.to(mesh.device)
            with self.autocast():
                out = model(
                    input_ids=mb.input_ids,
                    labels=mb.labels,
                    position_ids=mb.position_ids,
                    doc_spans=mb.doc_spans,
                )
            loss_sum += out.loss_sum.item()
            num_tokens += out.num_tokens
        loss_sum, num_tokens = all_reduce_sum(loss_sum, mesh), all_reduce_sum(num_tokens, mesh)
        return {"val_loss": loss_sum / max(num_tokens, 1), "val_tokens": int(num_tokens)}

    def _flops(self, work: Work) -> float:
        """Model FLOPs of this rank's share of the documents ``work`` was cut from."""
        tokens = sum(work.doc_lengths)
        mean_doc = sum(n * n for n in work.doc_lengths) / max(1, tokens)
        cfg = self.model.config
        hidden_q = cfg.num_attention_heads * head_dim_of(cfg)
        per_token = model_flops_per_token(self._dense_params, cfg.num_hidden_layers, hidden_q, mean_doc)
        return per_token * tokens * work.share

    @functools.cached_property
    def _dense_params(self) -> int:
        return sum(p.numel() for n, p in self.model.named_parameters() if "embed_tokens" not in n)

    @property
    def state(self) -> TrainState:
        return TrainState(self.model, self.optimizer, self.scheduler, self.loader)

    def close(self) -> None:
        """Release the checkpointer's, the activation executor's and the optimizer's threads and
        files, and leave the process group."""
        self.checkpointer.close()
        self.model.layer_executor.close()
        self.optimizer.close()
        shutdown(self.mesh)

    def _stop_preempted(self, step: int) -> None:
        """After a SIGTERM (every rank, the same step): a checkpoint of this step, then stop."""
        path = self.checkpointer.persist(step, self.state)
        if self.mesh.is_main:
            saved = (
                f"saved a checkpoint of it to {path}" if path else "nothing saved (checkpoint.enabled=false)"
            )
            print(
                f"longtrain: preempted (SIGTERM): stopped after step {step}, {saved}; re-run the same command to continue",
                flush=True,
            )

    def run(self) -> list[dict[str, Any]]:
        """Train from ``start_step`` to ``train.steps``; returns the logged metric dicts."""
        cfg, mesh = self.cfg, self.mesh
        writer = MetricsWriter(
            cfg.output_dir,
            enabled=mesh.is_main,
            progress=cfg.logging.progress,
            total_steps=cfg.train.steps,
            start_step=self.start_step,  # lines of steps after it (re-run after a crash) are dropped
            wandb_cfg={
                "project": cfg.logging.wandb_project,
                "name": cfg.logging.wandb_run_name,
                "id": wandb_run_id(cfg.output_dir),
            }
            if cfg.logging.wandb
            else None,
            config=dataclasses.asdict(cfg),
        )
        peak = cfg.logging.peak_flops or detect_peak_flops(mesh.device, cfg.train.torch_dtype)
        logged: list[dict[str, Any]] = []
        total_tokens = self.start_step * self.batches.tokens_per_step
        window_tokens, window_flops, window_start = 0, 0.0, time.perf_counter()
        try:
            with self.preemption:  # SIGTERM: stop after the step all ranks agree on, saved
                for step in range(self.start_step + 1, cfg.train.steps + 1):
                    result = self.train_step(next(self.batches))
                    total_tokens += result.seen_tokens
                    window_tokens += result.seen_tokens
                    window_flops += result.model_flops
                    if result.num_tokens == 0:
                        writer.warn(
                            f"step {step} had no loss tokens on any rank (loss 0, zero gradients): its "
                            "micro-batches hold only document starts and padding"
                        )
                    last = step == cfg.train.steps
                    metrics: dict[str, Any] = {}
                    if step % cfg.train.log_every == 0 or last:
                        elapsed = max(time.perf_counter() - window_start, 1e-9)
                        metrics = {
                            "step": step,
                            "loss": result.loss,
                            "lr": result.lr,
                            "grad_norm": result.grad_norm,
                            "tokens": total_tokens,
                            "loss_tokens": result.num_tokens,
                            "tokens_per_s": window_tokens / elapsed,
                            "mfu": window_flops / elapsed / (peak * mesh.world_size),
                            "mem_peak_bytes": peak_memory_bytes(mesh.device),
                            **self.model.layer_executor_stats(),
                            **self.optimizer.stats(),
                            **self.checkpointer.stats(),
                        }
                        if cfg.parallel.mode != "dp":
                            metrics.update(result.balance())
                        window_tokens, window_flops, window_start = 0, 0.0, time.perf_counter()
                    if self.val_rows is not None and (
                        last or (cfg.train.eval_every and step % cfg.train.eval_every == 0)
                    ):
                        eval_start = time.perf_counter()
                        metrics = {"step": step, **metrics, **self.evaluate()}
                        window_start += time.perf_counter() - eval_start  # not training throughput
                    if metrics:
                        writer.log(metrics)
                        logged.append(metrics)
                    writer.step_done()  # after log: the bar's frame for this step shows this step's metrics
                    if self.checkpointer.should_save(step, cfg.train.steps):
                        self.checkpointer.save(step, self.state)
                    if result.preempted and not last:
                        self._stop_preempted(step)
                        break
        finally:
            writer.close()
        return logged


def all_reduce_step_totals(
    loss_sum: float, flops: float, busy: float, preempted: bool, mesh: Mesh
) -> tuple[float, float, list[float], bool]:
    """The loss sum and FLOPs over all ranks, every rank's busy seconds, and whether any rank was
    preempted (SIGTERM), in one collective."""
    busy_slots = [0.0] * mesh.world_size
    busy_slots[mesh.rank] = busy
    totals = all_reduce_sums([loss_sum, flops, float(preempted), *busy_slots], mesh)
    return totals[0], totals[1], totals[3:], totals[2] > 0


def wandb_run_id(output_dir: str) -> str:
    """One wandb run per output_dir: its id is made once and kept there, so a resume continues it."""
    path = Path(output_dir) / "wandb_run_id"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(uuid.uuid4().hex[:16])
    return path.read_text().strip()


def prepare(cfg: JobConfig) -> Job:
    """Everything before the first step: mesh, data, model, optimizer, checkpoint resume."""
    mesh = init_mesh(cfg.parallel, cfg.train.device)
    tokenizer, loader, val_rows = build_data(cfg, mesh)
    model = build_model(cfg, mesh, tokenizer.vocab_size)
    check_layout(cfg, mesh, model)
    if cfg.parallel.mode != "dp":
        probe_with_local_core(model)
    batches = StepBatches(cfg, mesh, loader, model)
    if cfg.parallel.mode == "hdp":
        batches.cost, source = hdp_cost_model(cfg, mesh, model)
        if mesh.is_main:
            c = batches.cost
            print(
                f"longtrain: hdp cost model ({source}): attention {c.attn:.3g} s/token^2, rows {c.linear:.3g} "
                f"s/token, {c.fixed:.3g} s per micro-batch, ring hop {c.comm:.3g} s/token",
                flush=True,
            )
    zero3 = Zero3Spec(cfg.optim, cfg.train.grad_accum, cfg.data.micro_batch_size, cfg.train.dtype)
    sharding = apply_sharding(cfg.parallel, model, mesh, zero3)
    optimizer, scheduler = build_optimizer(cfg, mesh, model, sharding)
    checkpointer = build_checkpointer(cfg, mesh, model, sharding)
    restored = checkpointer.load(TrainState(model, optimizer, scheduler, loader))
    start_step = 0 if restored is None else restored.step
    if restored is not None and mesh.is_main:
        where = f"agent memory ({restored.path})" if restored.source == "agent memory" else restored.path
        print(f"longtrain: resumed from {where} (step {start_step})", flush=True)
    if mesh.is_main:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "config.yaml").write_text(to_yaml(cfg))
    return Job(
        cfg,
        mesh,
        tokenizer,
        loader,
        batches,
        model,
        sharding,
        optimizer,
        scheduler,
        checkpointer,
        start_step,
        val_rows,
    )


def train(cfg: JobConfig) -> list[dict[str, Any]]:
    """Build and train; returns the logged metrics (rank 0; other ranks return [])."""
    job = prepare(cfg)
    try:
        return job.run()
    finally:
        job.close()
