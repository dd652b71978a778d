"""ModelConfig.dtype "auto": bf16 where the hardware does it well, fp32 otherwise; the weight layout that goes with it."""

from __future__ import annotations

import pytest
import torch
from support.tiny import tiny_llama

from osd.config import ModelConfig
from osd.models import loading
from osd.models.loading import (
    cpu_flags,
    dtype_choice,
    parse_dtype,
    resolve_dtype,
    wants_transposed_layout,
)


@pytest.mark.parametrize("flags, want, why", [
    ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16, "auto: AVX512-BF16"),
    ({"avx2", "amx_tile", "amx_bf16"}, torch.bfloat16, "auto: AMX-BF16"),
    ({"avx2", "avx512f"}, torch.float32, "auto: no bf16 instructions"),
    (None, torch.float32, "auto: CPU flags unknown"),
])
def test_auto_on_cpu_follows_the_cpu_flags(monkeypatch, flags, want, why):
    monkeypatch.setattr(loading, "cpu_flags", lambda: flags)
    assert resolve_dtype("auto", "cpu") == want
    assert dtype_choice("auto", torch.device("cpu")) == (want, why)
    assert parse_dtype("auto") == want


def test_auto_on_cuda_asks_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx512_bf16"})  # the host CPU does not matter
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda") == torch.float32


def test_a_named_dtype_is_taken_as_is(monkeypatch):
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx512_bf16"})
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert dtype_choice("float16", "cpu") == (torch.float16, "configured")
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", "cpu")


def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse avx512_bf16 amx_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(str(info)) == {"fpu", "sse", "avx512_bf16", "amx_bf16"}
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert cpu_flags(str(tmp_path / "arm")) is None
    assert cpu_flags(str(tmp_path / "missing")) is None


def test_model_config_defaults_to_auto():
    assert ModelConfig().dtype == "auto"
    assert ModelConfig(dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be"):
        ModelConfig(dtype="fp8")


def test_layout_is_measured_for_fp32_on_cpu_only():
    fp32 = tiny_llama(vocab=16)
    bf16 = tiny_llama(vocab=16).to(torch.bfloat16)
    assert wants_transposed_layout(None, fp32) is None and wants_transposed_layout(None, bf16) is False
    assert wants_transposed_layout(True, bf16) and not wants_transposed_layout(False, fp32)


def test_faster_layout_keeps_the_faster_one_and_the_values(monkeypatch):
    import osd.decoding.cost as cost

    model = tiny_llama(vocab=16)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(ids).logits
    for transposed_ms, expect in ((1.0, True), (9.0, False)):
        # The curve's timings decide: fake them (the real ones are noise on a tiny model); the layout is real.
        fake = lambda m, **kw: {1: transposed_ms if not m.model.layers[0].mlp.up_proj.weight.is_contiguous() else 5.0}
        monkeypatch.setattr(cost, "forward_cost_curve", fake)
        chosen, ms = loading.faster_layout(model)
        assert chosen is expect and ms == {"standard": 5.0, "transposed": transposed_ms}
        assert model.model.layers[0].mlp.up_proj.weight.is_contiguous() is not expect
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, before, atol=1e-5)
        loading.standard_linear_weights(model)
        assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_load_target_resolves_lays_out_and_logs(tmp_path, monkeypatch, caplog):
    path = tmp_path / "tiny"
    tiny_llama(vocab=16).save_pretrained(path)
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx512_bf16"})
    with caplog.at_level("INFO", logger="osd.models.loading"):
        target = loading.load_target(ModelConfig(target=str(path)))
    assert target.dtype == torch.bfloat16 and target.model.layers[0].mlp.up_proj.weight.is_contiguous()
    assert f"osd: target {path} on cpu in bfloat16 (auto: AVX512-BF16)" in caplog.text
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx2"})
    with caplog.at_level("INFO", logger="osd.models.loading"):
        target = loading.load_target(ModelConfig(target=str(path)))  # float32 on CPU: the layout is measured
    assert target.dtype == torch.float32 and "weight layout (measured: T(1)+T(8)" in caplog.text
    measured_transposed = not target.model.layers[0].mlp.up_proj.weight.is_contiguous()
    assert f"{'[in, out]' if measured_transposed else 'standard'} weight layout (measured" in caplog.text
    target = loading.load_target(ModelConfig(target=str(path), transpose_weights=True))
    assert not target.model.layers[0].mlp.up_proj.weight.is_contiguous()  # [in, out] as set
