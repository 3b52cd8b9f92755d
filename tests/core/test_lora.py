"""LoRA merging: W' = W + strength * alpha / rank * up @ down for every key style, nothing silently lost."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from causvid_core.checkpoint import load_model, save_model
from causvid_core.config import PRESETS
from causvid_core.lora import LoraError, merge_lora
from causvid_core.model import CausalWanModel

CFG = PRESETS["tiny"].dit  # dim 64, ffn 128
# (Wan module, diffusers module, rank, alpha or None)
TARGETS = [
    ("blocks.0.self_attn.q", "blocks.0.attn1.to_q", 4, 8.0),
    ("blocks.1.cross_attn.o", "blocks.1.attn2.to_out.0", 2, None),
    ("blocks.1.ffn.0", "blocks.1.ffn.net.0.proj", 3, 1.5),
]
STYLES = {
    "comfy": lambda wan, diff: (f"diffusion_model.{wan}", "lora_down.weight", "lora_up.weight"),
    "peft_plain": lambda wan, diff: (wan, "lora_A.weight", "lora_B.weight"),
    "kohya": lambda wan, diff: ("lora_unet_" + wan.replace(".", "_"), "lora_down.weight", "lora_up.weight"),
    "diffusers": lambda wan, diff: (f"transformer.{diff}", "lora_A.weight", "lora_B.weight"),
}


@pytest.fixture()
def model() -> CausalWanModel:
    return CausalWanModel(CFG).eval()


def make_lora(model: CausalWanModel, style: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A LoRA file in ``style`` and, per Wan weight key, its (alpha / rank) * up @ down."""
    weights = dict(model.named_parameters())
    lora, deltas = {}, {}
    for wan, diff, rank, alpha in TARGETS:
        out_f, in_f = weights[f"{wan}.weight"].shape
        down, up = torch.randn(rank, in_f), torch.randn(out_f, rank)
        name, down_key, up_key = STYLES[style](wan, diff)
        lora[f"{name}.{down_key}"], lora[f"{name}.{up_key}"] = down, up
        if alpha is not None:
            lora[f"{name}.alpha"] = torch.tensor(alpha)
        scale = alpha / rank if alpha is not None else 1.0
        deltas[f"{wan}.weight"] = scale * torch.einsum("or,ri->oi", up, down)
    return lora, deltas


@pytest.mark.parametrize("style", list(STYLES))
def test_merge_equals_w_plus_scaled_up_down(model: CausalWanModel, style: str) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora, deltas = make_lora(model, style)
    report = merge_lora(model, lora, strength=0.7)
    assert sorted(report.matched) == sorted(t[0] for t in TARGETS)
    assert report.unmatched == [] and report.num_keys == len(lora)
    after = model.state_dict()
    for key, value in after.items():
        expected = before[key] + 0.7 * deltas[key] if key in deltas else before[key]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)


def test_merge_into_state_dict_matches_merge_into_model(model: CausalWanModel) -> None:
    lora, _ = make_lora(model, "comfy")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(sd, lora, strength=-1.3)
    merge_lora(model, lora, strength=-1.3)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(sd[key], value, rtol=0, atol=0)


def test_diff_and_diff_b_keys(model: CausalWanModel) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    diff, diff_b = torch.randn(CFG.dim), torch.randn(CFG.dim * 6)
    lora = {"diffusion_model.blocks.0.norm3.diff": diff, "diffusion_model.time_projection.1.diff_b": diff_b}
    report = merge_lora(model, lora, strength=0.5)
    assert sorted(report.matched) == ["blocks.0.norm3", "time_projection.1"]
    torch.testing.assert_close(model.blocks[0].norm3.weight, before["blocks.0.norm3.weight"] + 0.5 * diff)
    torch.testing.assert_close(model.time_projection[1].bias, before["time_projection.1.bias"] + 0.5 * diff_b)


def test_unmatched_keys_are_reported_and_warned(model: CausalWanModel) -> None:
    lora, _ = make_lora(model, "comfy")
    lora["diffusion_model.blocks.7.self_attn.q.lora_down.weight"] = torch.randn(2, CFG.dim)  # no block 7
    lora["diffusion_model.blocks.7.self_attn.q.lora_up.weight"] = torch.randn(CFG.dim, 2)
    lora["diffusion_model.blocks.0.self_attn.k.lora_down.weight"] = torch.randn(2, CFG.dim)  # no up
    lora["text_encoder.layer.0.weight"] = torch.randn(2)
    with pytest.warns(UserWarning, match="4 of 12 keys unmatched"):
        report = merge_lora(model, lora, strength=1.0)
    reasons = dict(report.unmatched)
    assert reasons["diffusion_model.blocks.7.self_attn.q.lora_down.weight"] == "no such module in this model"
    assert "without its lora_up" in reasons["diffusion_model.blocks.0.self_attn.k.lora_down.weight"]
    assert "not a LoRA key" in reasons["text_encoder.layer.0.weight"]
    assert len(report.matched) == len(TARGETS)


def test_lora_matching_nothing_is_an_error(model: CausalWanModel) -> None:
    lora = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 8),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(8, 4)}  # fmt: skip
    with pytest.raises(LoraError, match="matches no weight of this model"):
        merge_lora(model, lora)


def test_lora_for_another_size_is_an_error(model: CausalWanModel) -> None:
    big = 1536  # a 1.3B LoRA on the tiny model: names match, shapes do not
    lora = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, big),
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(big, 4)}  # fmt: skip
    before = model.blocks[0].self_attn.q.weight.clone()
    with pytest.raises(LoraError, match=r"up @ down is \[1536, 1536\], the weight is \[64, 64\]"):
        merge_lora(model, lora)
    assert torch.equal(model.blocks[0].self_attn.q.weight, before)


def test_load_model_merges_lora_files(tmp_path: Path, model: CausalWanModel) -> None:
    base = save_model(model, tmp_path / "base.safetensors")
    lora, deltas = make_lora(model, "kohya")
    save_file(lora, str(tmp_path / "lora.safetensors"))
    torch.save(make_lora(model, "comfy")[0], tmp_path / "lora2.pt")
    merged, report = load_model(base, lora=[(tmp_path / "lora.safetensors", 0.25)])
    (lora_report,) = report.loras
    assert len(lora_report.matched) == len(TARGETS) and "3 modules patched" in report.summary()
    for key, delta in deltas.items():
        torch.testing.assert_close(merged.state_dict()[key], model.state_dict()[key] + 0.25 * delta)
    _, report2 = load_model(base, lora=[(tmp_path / "lora2.pt", 1.0)])
    assert len(report2.loras[0].matched) == len(TARGETS)


def test_inspect_merges_a_lora_given_as_file_colon_strength(tmp_path: Path, model: CausalWanModel, capsys,
                                                            monkeypatch) -> None:  # fmt: skip
    """``python -m causvid_core inspect CKPT --lora FILE[:STRENGTH]`` merges it at that strength and
    reports the patched modules; a path that itself holds a colon keeps it (strength 1)."""
    import causvid_core.checkpoint as checkpoint
    from causvid_core import cli

    base = save_model(model, tmp_path / "base.safetensors")
    save_file(make_lora(model, "kohya")[0], str(tmp_path / "lora.safetensors"))
    seen = []
    load = checkpoint.load_model  # the CLI imports it from causvid_core.checkpoint when it runs

    def spy(path, **kw):
        seen.append(kw["lora"])
        return load(path, **kw)

    monkeypatch.setattr(checkpoint, "load_model", spy)
    assert cli.main(["inspect", str(base), "--lora", f"{tmp_path / 'lora.safetensors'}:0.25"]) == 0
    assert "3 modules patched" in capsys.readouterr().out
    assert seen == [[(str(tmp_path / "lora.safetensors"), 0.25)]]
    assert cli._lora_arg("C:/loras/style.safetensors") == ("C:/loras/style.safetensors", 1.0)
    assert cli._lora_arg("a:b.safetensors:-0.5") == ("a:b.safetensors", -0.5)
