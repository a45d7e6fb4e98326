"""LoRAAdapter: PEFT directory round-trips both ways, bytes, and every rejection."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from lora_harness import Engine, dims_of, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from loquetier.lora.adapter import LoRAAdapter, peft_key, resolve_adapter_dir
from loquetier.lora.config import AdapterError, LoRAConfig
from loquetier.lora.pool import LoRASlotPool

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_adapter(dims, rank=4, modules=ALL, rslora=False, seed=0) -> LoRAAdapter:
    adapter = LoRAAdapter.new(
        LoRAConfig(rank=rank, alpha=8, target_modules=modules, use_rslora=rslora), dims, seed=seed
    )
    gen = torch.Generator().manual_seed(seed + 1)
    for a, b in adapter.weights.values():
        b.copy_(torch.randn(b.shape, generator=gen) * 0.3)
    return adapter


@pytest.mark.parametrize("rslora", [False, True])
def test_our_save_loads_in_peft_with_same_logits(tmp_path: Path, rslora: bool) -> None:
    model = tiny_llama()
    dims = dims_of(model)
    adapter = random_adapter(
        dims, rank=4, modules=("q_proj", "v_proj", "down_proj", "up_proj"), rslora=rslora
    )
    adapter.save(tmp_path / "a")
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "a").iterdir()}
    assert len(set(modes.values())) == 1, modes  # the weights as readable as the config (safetensors makes 600)
    ids = torch.tensor([[1, 5, 9, 17, 33, 2, 8]])

    # hand-merged reference: W' = W + scale * B @ A
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for (layer, module), (a, b) in adapter.weights.items():
            block = merged.model.layers[layer]
            lin = getattr(
                block.self_attn if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else block.mlp,
                module,
            )
            lin.weight += adapter.scale * b @ a
        want = merged(input_ids=ids).logits

    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a").eval()
    with torch.no_grad():
        got_peft = peft_model(input_ids=ids).logits
    torch.testing.assert_close(got_peft, want, atol=1e-4, rtol=1e-4)

    pool = LoRASlotPool(dims, num_slots=2, max_rank=8)
    pool.write_slot(1, LoRAAdapter.load(tmp_path / "a", dims).weights, adapter.scale)
    ours = Engine(copy.deepcopy(model), pool).logits(ids[0].tolist(), slot=1)
    torch.testing.assert_close(ours, want[0], atol=1e-4, rtol=1e-4)


def test_peft_save_loads_identically(tmp_path: Path) -> None:
    model = tiny_llama()
    cfg = LoraConfig(
        r=3,
        lora_alpha=6,
        target_modules=["q_proj", "o_proj", "gate_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    peft_model.save_pretrained(tmp_path / "p")
    ours = LoRAAdapter.load(tmp_path / "p", dims_of(model))
    stored = load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert ours.config.rank == 3 and ours.scale == 2.0
    assert set(ours.config.target_modules) == {"q_proj", "o_proj", "gate_proj"}
    assert len(ours.weights) == 2 * 3
    for (layer, module), (a, b) in ours.weights.items():
        assert torch.equal(a, stored[peft_key(layer, module, "A")])
        assert torch.equal(b, stored[peft_key(layer, module, "B")])
    # and back out: our save of it is byte-for-byte the same tensors
    ours.save(tmp_path / "q")
    again = load_file(tmp_path / "q" / "adapter_model.safetensors")
    assert again.keys() == stored.keys() and all(torch.equal(again[k], stored[k]) for k in stored)


def test_bytes_round_trip() -> None:
    dims = dims_of(tiny_llama())
    adapter = random_adapter(dims, rank=2, modules=("k_proj",))
    adapter.extra["job_id"] = "j1"
    back = LoRAAdapter.from_bytes(adapter.to_bytes(), dims)
    assert back.config == adapter.config and back.extra == {"job_id": "j1"}
    assert all(
        torch.equal(back.weights[k][i], adapter.weights[k][i]) for k in adapter.weights for i in (0, 1)
    )
    with pytest.raises(AdapterError):
        LoRAAdapter.from_bytes(b"garbage")


def test_new_adapter_is_peft_init_and_seeded() -> None:
    dims = dims_of(tiny_llama())
    cfg = LoRAConfig(rank=4, target_modules=("q_proj",))
    one, two, other = (LoRAAdapter.new(cfg, dims, seed=s) for s in (7, 7, 8))
    a, b = one.weights[(0, "q_proj")]
    assert torch.equal(a, two.weights[(0, "q_proj")][0]) and not torch.equal(
        a, other.weights[(0, "q_proj")][0]
    )
    assert torch.count_nonzero(b) == 0
    bound = 1 / dims.hidden_size**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound


# --- rejections --------------------------------------------------------------------------------


def write_dir(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def good(dims, rank=2) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 4, "target_modules": ["q_proj"], "lora_dropout": 0.0}
    tensors = {}
    for layer in range(dims.num_layers):
        tensors[peft_key(layer, "q_proj", "A")] = torch.zeros(rank, 32)
        tensors[peft_key(layer, "q_proj", "B")] = torch.zeros(32, rank)
    return cfg, tensors


BAD_CONFIGS = [
    ({"peft_type": "PREFIX_TUNING"}, "peft_type"),
    ({"peft_type": "LORA", "use_dora": True}, "use_dora"),
    ({"layer_replication": [[0, 2]]}, "layer_replication"),
    ({"target_modules": ["q_proj", "lm_head"]}, "unknown LoRA target"),
    ({"target_modules": ".*proj"}, "pattern"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
    ({"bias": "all"}, "bias"),
    ({"r": 3}, "rank"),
    ({"lora_alpha": -1}, "alpha"),
    # values a hostile producer sent: each once reached the worker's catch-all as "internal"
    ({"r": 10**400}, "r must be at most"),
    ({"lora_alpha": 10**400}, "lora_alpha a float's range"),
    ({"r": True}, "must be numbers"),
    ({"layers_to_transform": ["a"]}, "layers_to_transform"),
    ({"layers_to_transform": "ab"}, "layers_to_transform"),
    ({"layers_to_transform": {"a": 1}}, "layers_to_transform"),
    ({"layers_to_transform": [None]}, "layers_to_transform"),
    ({"use_rslora": "no"}, "use_rslora must be true or false"),
]


@pytest.mark.parametrize(("patch", "message"), BAD_CONFIGS)
def test_rejects_bad_configs(tmp_path: Path, patch: dict, message: str) -> None:
    dims = dims_of(tiny_llama())
    cfg, tensors = good(dims)
    write_dir(tmp_path / "x", {**cfg, **patch}, tensors)
    with pytest.raises(AdapterError, match=message):
        LoRAAdapter.load(tmp_path / "x", dims)


def test_rejects_unreadable_config_files(tmp_path: Path) -> None:
    dims = dims_of(tiny_llama())
    cfg, tensors = good(dims)
    for name, content, message in (("latin", b'{"peft_type": "LORA", "r": 2, "x": "\xff"}', "unreadable JSON"),
                                   ("deep", b"[" * 100_000 + b"]" * 100_000, "nested too deeply")):
        write_dir(tmp_path / name, cfg, tensors)
        (tmp_path / name / "adapter_config.json").write_bytes(content)
        with pytest.raises(AdapterError, match=message):
            LoRAAdapter.load(tmp_path / name, dims)


def test_rejects_bad_weights(tmp_path: Path) -> None:
    dims = dims_of(tiny_llama())
    cfg, tensors = good(dims)
    cases = {
        "wrong shape": ({**tensors, peft_key(0, "q_proj", "A"): torch.zeros(2, 31)}, "do not fit"),
        "no B": (
            {k: v for k, v in tensors.items() if not k.endswith("0.self_attn.q_proj.lora_B.weight")},
            "both be present",
        ),
        "missing layer": ({k: v for k, v in tensors.items() if ".layers.1." not in k}, "missing weights"),
        "extra module": (
            {
                **tensors,
                peft_key(0, "k_proj", "A"): torch.zeros(2, 32),
                peft_key(0, "k_proj", "B"): torch.zeros(16, 2),
            },
            "not in target_modules",
        ),
        "too many layers": (
            {
                **tensors,
                peft_key(5, "q_proj", "A"): torch.zeros(2, 32),
                peft_key(5, "q_proj", "B"): torch.zeros(32, 2),
            },
            "only 2 layers",
        ),
        "embedding": (
            {**tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(2, 32)},
            "unsupported",
        ),
    }
    for name, (bad, message) in cases.items():
        write_dir(tmp_path / name, cfg, bad)
        with pytest.raises(AdapterError, match=message):
            LoRAAdapter.load(tmp_path / name, dims)


def test_rejects_missing_files(tmp_path: Path) -> None:
    dims = dims_of(tiny_llama())
    with pytest.raises(AdapterError, match="does not exist"):
        LoRAAdapter.load(tmp_path / "nope", dims)
    cfg, tensors = good(dims)
    write_dir(tmp_path / "a", cfg, tensors)
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="missing adapter_model.safetensors"):
        LoRAAdapter.load(tmp_path / "a", dims)
    write_dir(tmp_path / "b", cfg, tensors)
    (tmp_path / "b" / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="missing adapter_config.json"):
        LoRAAdapter.load(tmp_path / "b", dims)
    write_dir(tmp_path / "c", cfg, tensors)
    (tmp_path / "c" / "adapter_model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(AdapterError, match="unreadable"):
        LoRAAdapter.load(tmp_path / "c", dims)


@pytest.mark.parametrize(
    "bad_id", ["../x", "a/../../x", "/etc", "a//b", ".hidden", "a\\b", "-rf", "", "a/./b"]
)
def test_rejects_escaping_adapter_ids(tmp_path: Path, bad_id: str) -> None:
    with pytest.raises(AdapterError):
        resolve_adapter_dir(tmp_path, bad_id)


def test_rejects_symlink_escape(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    assert resolve_adapter_dir(tmp_path / "root", "org/name-1.v2") == (
        tmp_path / "root" / "org" / "name-1.v2"
    )
    with pytest.raises(AdapterError, match="outside"):
        resolve_adapter_dir(tmp_path / "root", "link")


def test_config_validation() -> None:
    with pytest.raises(AdapterError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(AdapterError, match="dropout"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(AdapterError, match="unknown"):
        LoRAConfig(target_modules=("qkv_proj",))
    assert LoRAConfig(rank=4, alpha=8, use_rslora=True).scale == 4.0
    assert LoRAConfig(target_modules=["v_proj", "q_proj"]).target_modules == ("q_proj", "v_proj")
