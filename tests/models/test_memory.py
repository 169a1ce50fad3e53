"""The per-GPU memory estimate (steer.models.memory): exact parameter counts, the layout read from
the real configs, the arithmetic against tensors that are actually allocated, and the start-up check."""

from __future__ import annotations

import logging
import subprocess
import sys
import weakref
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from steer.knobs import ConfigError
from steer.models.memory import (
    KNOWN_ARCHITECTURES,
    Architecture,
    Layout,
    architecture_for,
    check_memory,
    decoder_weight_bytes,
    estimate,
    kv_cache_bytes,
    layout_from_config,
)
from tests.conftest import REPO, compose

GiB = 2**30


def tiny_qwen2_config(tied: bool, **overrides):
    from transformers import Qwen2Config

    settings = dict(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, max_position_embeddings=256)
    return Qwen2Config(**{**settings, **overrides})


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors once


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_is_exact_for_qwen2(tied):
    from transformers import AutoModelForCausalLM

    config = tiny_qwen2_config(tied)
    model = AutoModelForCausalLM.from_config(config)
    assert Architecture.from_hf_config(config).parameters == parameter_count(model)
    assert Architecture.from_hf_config(config.to_dict()).parameters == parameter_count(model)  # a config.json's dict


def test_parameter_count_is_exact_for_llama_with_biases():
    from transformers import AutoModelForCausalLM, LlamaConfig

    for bias in (False, True):
        config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=1, attention_bias=bias, mlp_bias=bias,
                             tie_word_embeddings=False)
        assert Architecture.from_hf_config(config).parameters == parameter_count(AutoModelForCausalLM.from_config(config))


def test_architecture_for_reads_a_local_config_json(tmp_path):
    config = tiny_qwen2_config(tied=False)
    config.save_pretrained(tmp_path)
    assert architecture_for(str(tmp_path)) == Architecture.from_hf_config(config)
    assert architecture_for(str(tmp_path / "missing")) is None  # neither a folder, a cached config nor a known id


@pytest.mark.parametrize("name, expected", [
    ("Qwen/Qwen2.5-Math-7B", 7.62e9),
    ("Qwen/Qwen2.5-Coder-7B", 7.62e9),
    ("Qwen/Qwen2.5-Math-1.5B", 1.54e9),
    ("Qwen/Qwen2.5-14B", 14.77e9),
])
def test_known_architectures_have_the_published_sizes(name, expected):
    assert architecture_for(name) is not None
    assert abs(KNOWN_ARCHITECTURES[name].parameters / expected - 1) < 0.01


SEVEN_B = KNOWN_ARCHITECTURES["Qwen/Qwen2.5-Math-7B"]


def paper_layout(**changes) -> Layout:
    settings = dict(ranks=8, fsdp=True, param_bytes=4, compute_bytes=2, activation_checkpointing=True,
                    micro_batch_sequences=8, prompt_tokens=1024, response_tokens=3072, logprob_chunk_tokens=4096,
                    engine="hf", rank_sequences=512, samples_per_prompt=8, max_batch_sequences=64)
    return Layout(**{**settings, **changes})


def test_fsdp_divides_the_resident_bytes_by_the_ranks():
    sharded = estimate(SEVEN_B, paper_layout())
    single = estimate(SEVEN_B, paper_layout(fsdp=False, ranks=1))
    assert sharded.resident == pytest.approx(single.resident / 8, rel=1e-9)
    assert single.resident == pytest.approx(16 * SEVEN_B.parameters, rel=1e-9)  # float32 weights, gradients, m, v
    offloaded = estimate(SEVEN_B, paper_layout(cpu_offload=True))
    assert offloaded.resident == 0 and any("CPU memory" in note for note in offloaded.notes)


def test_the_reference_model_is_a_full_copy_even_under_fsdp():
    # RLVRModule deep-copies the policy in __init__; configure_model shards only self.policy.
    with_reference = estimate(SEVEN_B, paper_layout(reference_model=True))
    without = estimate(SEVEN_B, paper_layout())
    assert with_reference.resident - without.resident == 4 * SEVEN_B.parameters


def test_checkpointing_and_smaller_micro_batches_reduce_the_update():
    plain = estimate(SEVEN_B, paper_layout(activation_checkpointing=False)).total("update")
    checkpointed = estimate(SEVEN_B, paper_layout()).total("update")
    smaller = estimate(SEVEN_B, paper_layout(micro_batch_sequences=2)).total("update")
    assert checkpointed < plain / 4
    assert smaller < checkpointed


def test_vllm_takes_its_share_while_generating_and_nothing_asleep():
    layout = paper_layout(fsdp=False, ranks=1, engine="vllm", gpu_memory_utilization=0.4, sleep_level=1)
    device = 80 * GiB
    asleep = estimate(KNOWN_ARCHITECTURES["Qwen/Qwen2.5-Math-1.5B"], layout, device)
    # the engine's share, and the weight sync's one bucket (the 1 GiB limit: the 1.5B's largest
    # unit, its 0.47 GB bf16 embedding, is below it)
    assert asleep.total("rollout") == int(0.4 * device) + 2**30
    assert [line.bytes for line in asleep.lines if line.name == "weight-sync bucket"] == [2**30]
    assert not any("vLLM" in line.name for line in asleep.lines if line.phase == "update")
    awake = estimate(KNOWN_ARCHITECTURES["Qwen/Qwen2.5-Math-1.5B"], paper_layout(
        fsdp=False, ranks=1, engine="vllm", gpu_memory_utilization=0.4, sleep_level=0), device)
    assert awake.total("update") == asleep.total("update") + int(0.4 * device)


def test_a_fixed_kv_cache_engine_splits_its_weights_over_tensor_parallel_ranks():
    arch = SEVEN_B
    kv = 4 * GiB
    one, four = (estimate(arch, paper_layout(engine="vllm", kv_cache_memory_bytes=kv, engine_tensor_parallel=tp))
                 for tp in (1, 4))
    engine = {tp: [line.bytes for line in result.lines if line.name == "vLLM engine"][0] for tp, result in ((1, one), (4, four))}
    assert engine[1] == arch.parameters * 2 + kv and engine[4] == arch.parameters * 2 // 4 + kv
    # the 7B's embedding (152,064 x 3,584 x 2 B = 1.09 GB) is one unit above the 1 GiB limit
    assert [line.bytes for line in four.lines if line.name == "weight-sync bucket"] == [152064 * 3584 * 2]


@pytest.mark.parametrize("engine_dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_matches_the_buffers_the_decoder_allocates(engine_dtype):
    """The functional decoder holds its key/value buffers in the decoding dtype (rollout.engine.dtype),
    float32 weights or not."""
    from transformers import AutoModelForCausalLM

    from steer.rollout.decode import FunctionalDecoder

    config = tiny_qwen2_config(tied=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    arch = Architecture.from_hf_config(config)
    batch, prompt, new = 6, 5, 7
    decoder = FunctionalDecoder(model, torch.ones(batch, prompt, dtype=torch.bool), prompt + new, engine_dtype)
    allocated = sum(t.numel() * t.element_size() for t in [*decoder.keys, *decoder.values])
    element = torch.finfo(engine_dtype).bits // 8
    assert kv_cache_bytes(arch, batch, prompt + new, element_bytes=element) == allocated
    # The estimate's KV line for this layout (not sharded: the functional decoder, float32 weights).
    layout = Layout(param_bytes=4, compute_bytes=4, prompt_tokens=prompt, response_tokens=new, rank_sequences=batch,
                    samples_per_prompt=2, micro_batch_sequences=batch, engine_dtype_bytes=element)
    line = next(line for line in estimate(arch, layout).lines if line.name == "KV cache")
    assert line.bytes == allocated


@pytest.mark.parametrize("engine_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["qwen2", "llama_biases"])
def test_the_decoders_joined_weights_are_the_bytes_it_copies(engine_dtype, family, monkeypatch):
    """float32 decoding copies the joined q/k/v and gate/up (o, down and the head are the parameters
    themselves unless prepacked); bf16 decoding casts every projection and the head. On a CPU the
    weights of at least PREPACK_MIN_WEIGHTS elements are prepacked for oneDNN (a copy each); the
    threshold is lowered here so that some of the tiny model's weights are and some are not.
    Qwen2: q/k/v biases; the Llama: biases on every projection."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from steer.rollout import decode
    from steer.rollout.decode import FunctionalDecoder

    if family == "qwen2":
        config = tiny_qwen2_config(tied=True)
    else:
        config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).eval()
    arch = Architecture.from_hf_config(config)
    element = torch.tensor([], dtype=engine_dtype).element_size()
    params = {t.untyped_storage().data_ptr() for t in model.parameters()}
    # bf16 is prepacked only on CPUs with native bf16 arithmetic (AVX-512 BF16, AMX).
    can_pack = decode.prepacks_dtype(engine_dtype)
    assert can_pack == (engine_dtype == torch.float32 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    for threshold in (10**12, config.hidden_size**2):  # nothing prepacked; q/k/v, gate/up, down (and o) prepacked
        monkeypatch.setattr(decode, "PREPACK_MIN_WEIGHTS", threshold)
        decoder = FunctionalDecoder(model, torch.ones(2, 3, dtype=torch.bool), 8, dtype=engine_dtype)
        projections = [projection for block in decoder.blocks for projection in block[:4]] + [decoder.head_projection]
        packed = sum(projection.packed is not None for projection in projections)
        packing = can_pack and threshold < 10**6
        assert packed == (4 * config.num_hidden_layers + (config.vocab_size * config.hidden_size >= threshold) if packing else 0)
        copies = {}
        for tensor in (t for projection in projections for t in projection.tensors()):
            key = id(tensor) if tensor.is_mkldnn else tensor.untyped_storage().data_ptr()
            if tensor.is_mkldnn or key not in params:
                copies[key] = tensor.numel() * tensor.element_size()
        estimated = decoder_weight_bytes(arch, 4, element, prepacked=packing)[0]
        assert estimated == sum(copies.values()) > 0, (threshold, estimated, sum(copies.values()))


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of every storage an operator allocates, until it is freed; :attr:`peak` is the maximum.
    Storages that existed before (parameters) and views of them are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.storages: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self.storages.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in inputs and key not in self.storages and storage.nbytes():
                    self.storages[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.live)
        return out


@pytest.mark.parametrize("checkpointing, kernel", [(False, "sdpa"), (True, "sdpa"), (False, "eager"), (True, "eager")])
def test_update_estimate_matches_live_tensor_bytes_on_cpu(checkpointing, kernel):
    """The trainer's forward + backward of one micro-batch (chunked head included) on a tiny float32
    Qwen2: the measured peak of live tensors lies between 0.85 x the update estimate and the estimate
    plus all gradients (some of which exist at the peak). Measured: 55.7 MB vs 54.6 MB estimated
    without checkpointing, 18.8 MB vs 19.7 MB with it (SDPA); eager attention keeps the attention
    probabilities too (+8.4 MB here): MEASURED_EAGER."""
    from transformers import AutoModelForCausalLM

    from steer.algo.logprobs import response_logprobs_and_entropy
    from steer.models.loader import enable_activation_checkpointing

    config = tiny_qwen2_config(tied=False, vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    model.set_attn_implementation(kernel)
    if checkpointing:
        enable_activation_checkpointing(model)
    batch, prompt, response, chunk = 8, 32, 96, 256
    input_ids = torch.randint(0, config.vocab_size, (batch, prompt + response))
    attention = torch.ones_like(input_ids)
    attention[: batch // 2, :5] = 0  # left padding: the 4-D mask path, as in training
    with LiveTensorBytes() as tracker:
        logprobs, entropy = response_logprobs_and_entropy(model, input_ids, attention, response, chunk_tokens=chunk)
        (logprobs.sum() + entropy.sum()).backward()
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    layout = Layout(param_bytes=4, compute_bytes=4, activation_checkpointing=checkpointing, micro_batch_sequences=batch,
                    prompt_tokens=prompt, response_tokens=response, logprob_chunk_tokens=chunk, rank_sequences=batch,
                    eager_attention=kernel == "eager")
    update = estimate(Architecture.from_hf_config(config), layout).total("update")
    print(f"peak {tracker.peak / 1e6:.1f} MB, estimate {update / 1e6:.1f} MB")
    assert 0.85 * update <= tracker.peak <= 1.05 * (update + gradients), (tracker.peak, update, gradients)


def test_layout_from_the_paper_configs():
    math = layout_from_config(compose(["+experiment=steer_math"]), gpu=True)
    assert (math.fsdp, math.ranks, math.param_bytes, math.compute_bytes) == (True, 8, 4, 2)
    assert math.activation_checkpointing and math.micro_batch_sequences == 8 and math.sequence_tokens == 4096
    assert (math.engine, math.rank_sequences, math.logprob_chunk_tokens) == ("vllm", 512, 4096)
    assert (math.engine_tensor_parallel, math.sync_bucket_bytes, math.sleep_level) == (4, 2**30, 1)
    small = layout_from_config(compose(["+experiment=steer_math_1p5b"]), gpu=True)
    assert (small.fsdp, small.ranks, small.param_bytes, small.compute_bytes) == (False, 1, 4, 2)
    assert small.activation_checkpointing and small.engine == "vllm" and small.sleep_level == 1
    assert small.gpu_memory_utilization == pytest.approx(0.4)
    with_kl = layout_from_config(compose(["+experiment=steer_math", "algorithm.kl.coef=0.001"]), gpu=True)
    assert with_kl.reference_model


def _fake_gpu(monkeypatch, total_memory: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: SimpleNamespace(total_memory=total_memory))


def test_check_memory_refuses_a_layout_larger_than_the_gpu(monkeypatch):
    cfg = compose(["+experiment=steer_math"])
    _fake_gpu(monkeypatch, total_memory=16 * GiB)
    with pytest.raises(ConfigError) as error:
        check_memory(cfg)
    message = str(error.value)
    assert "(estimate)" in message and "AdamW m + v" in message and "KV cache" in message
    assert "algorithm.micro_batch_size" in message and "rollout.engine.max_batch_sequences" in message


def test_check_memory_passes_a_layout_that_fits(monkeypatch, caplog):
    cfg = compose(["+experiment=steer_math"])
    _fake_gpu(monkeypatch, total_memory=80 * GiB)
    with caplog.at_level(logging.INFO, logger="steer.models.memory"):
        check_memory(cfg)
    assert "(estimate)" in caplog.text and "fits" in caplog.text


def test_check_memory_only_logs_on_cpu(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="steer.models.memory"):
        check_memory(compose(["+experiment=steer_math"]))  # a GPU layout on a CPU machine: printed, not refused
        check_memory(compose([]))  # the embedded tiny model: nothing to estimate
        check_memory(compose(["model=hf", "model.path=Qwen/Qwen2.5-Math-7B", "trainer.accelerator=cpu"]))  # a CPU run: debug only
    assert caplog.text.count("GPU memory per device (estimate)") == 1
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="steer.models.memory"):
        check_memory(compose(["model=hf", f"model.path={tmp_path}"]))  # a folder without config.json
        check_memory(compose(["mode=eval"]))
    assert "no estimate" in caplog.text and caplog.text.count("\n") == 1


def test_the_script_prints_a_table_of_every_steer_experiment():
    done = subprocess.run([sys.executable, str(REPO / "experiments" / "memory_estimate.py"), "--table"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    names = sorted(path.stem for path in (REPO / "conf" / "experiment").glob("steer_*.yaml"))
    assert names
    rows = [line for line in done.stdout.splitlines() if line.startswith("| `")]
    for name in names:
        row = next((row for row in rows if row.startswith(f"| `{name}` |")), None)
        assert row is not None and "could not compose" not in row and "GiB" in row, (name, row)
    assert "estimate" in done.stdout


def test_the_readme_memory_table_is_what_the_estimate_gives():
    """README, "GPUs, memory and wall time": each row's resident and peak GiB per GPU are the
    estimate's for every experiment the row names (80 GB H100 / 96 GB H20 when the row gives two)."""
    import re

    from steer.models.memory import estimate_for_config

    text = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| (`steer_[^|]*) \|[^|]*\| ([\d.]+) GiB \| ([\d./ ]+) GiB \(", text, flags=re.M)
    named = set()
    for names, resident, peaks in rows:
        first = re.findall(r"`(steer_\w+)`", names)[0]
        experiments = [first] + [first + suffix for suffix in re.findall(r"`(_\w+)`", names)]
        for experiment in experiments:
            named.add(experiment)
            cfg = compose([f"+experiment={experiment}"])
            for peak, gib in zip(peaks.split(" / "), (80, 96)):
                result = estimate_for_config(cfg, device_bytes=gib * 2**30, gpu=True)
                assert f"{result.resident / 2**30:.1f}" == resident, (experiment, result.resident / 2**30)
                assert f"{result.peak / 2**30:.1f}" == peak.strip(), (experiment, gib, result.peak / 2**30)
    assert named == {path.stem for path in (REPO / "conf" / "experiment").glob("steer_*.yaml")}
