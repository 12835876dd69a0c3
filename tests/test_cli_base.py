"""`loraredux train --base`, `loraredux merge --base / --requantize` and `train --recommendation` following an NF4
recommendation: on the toy task of test_cli.py (the command's own logic) and end to end on the packaged MiniLM."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

import loraredux as lx
from loraredux.cli import main
from test_cli import TOY, toy  # noqa: F401 (the toy task's fixture)

pytest.importorskip("bitsandbytes")


def write_recommendation(folder, base: str, rank: int = 2) -> None:
    """A recommendation.json as `loraredux advise` writes it, reduced to what train reads."""
    folder.mkdir(parents=True, exist_ok=True)
    rec = {
        "config": lx.config("lora", rank=rank, alpha=4.0).to_dict(),
        "adapt": {"targets": ["query", "value"], "rank_pattern": None, "alpha_pattern": None},
        "choices": {"base": {"value": base, "reason": "..."}, "optimizer": {"value": "adamw"}},
    }
    (folder / "recommendation.json").write_text(json.dumps(rec))


def test_the_base_is_part_of_the_resume_signature(toy, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    toy.stop_step = 4
    assert main([*TOY, "--base", "int8", "--save-every", "2", "--out", str(out)]) == 130
    toy.stop_step = None
    assert main([*TOY, "--out", str(out), "--resume"]) == 2
    assert '--base "int8" there, "fp32" here' in capsys.readouterr().err
    assert main([*TOY, "--base", "int8", "--out", str(out), "--resume"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["base"] == "int8" and metrics["base_info"]["quantized_layers"] == 2


def test_a_recommendation_sets_the_base_unless_given(toy, tmp_path, capsys):  # noqa: F811
    write_recommendation(tmp_path / "rec", "nf4")
    argv = [*TOY[:3], "--no-progress", "--recommendation", str(tmp_path / "rec")]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    shown = capsys.readouterr().out
    # the toy's layers take 8 inputs: no block of 64 fits, so they stay dense, by name
    assert (
        "base nf4: 0 linear layers quantized to nf4 (double quantization, blocks of 64); left dense: "
        in shown
    )
    assert "query (in_features 8 is not a multiple of 64)" in shown
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["base"] == "nf4"
    assert main([*argv, "--base", "int8", "--out", str(tmp_path / "b")]) == 0
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["base"] == "int8" and metrics["config"]["rank"] == 2
    write_recommendation(tmp_path / "fp16", "fp16")
    assert main([*argv[:-1], str(tmp_path / "fp16")]) == 2
    assert "advises the base 'fp16', which train cannot put a model in" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- MiniLM


def minilm(quantized: bool = False):
    """The packaged MiniLM with a 2-class head; `quantized`: NF4 as transformers loads it (for PEFT)."""
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    from loraredux import assets

    kwargs = {}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["classifier"],
        )  # fmt: skip
    model = AutoModelForSequenceClassification.from_pretrained(
        assets.minilm_dir(), num_labels=2, dtype=torch.float32, **kwargs
    )
    return no_repacking(model)


def no_repacking(model):
    """No bfloat16 repacking of transformers' 4-bit layers at CPU inference (tests/io/test_peft_quantized.py)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model.eval()


IDS = torch.randint(1000, 2000, (3, 12), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nf4") / "run"
    argv = ["train", "--base", "nf4", "--init", "loftq", "--rank", "4", "--steps", "2",
            "--train-examples", "64", "--eval-examples", "16", "--no-progress", "--out", str(out)]  # fmt: skip
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        assert main(argv) == 0
    return out, shown.getvalue()


@pytest.mark.slow
def test_train_on_nf4_with_loftq_prints_and_records_the_base(nf4_run):
    out, shown = nf4_run
    # MiniLM's 37 linear layers but the classifier (a module to save): 6 x 6 in the encoder and the pooler
    assert (
        "base nf4: 37 linear layers quantized to nf4 (double quantization, blocks of 64)\n" in shown
    )
    line = next(s for s in shown.splitlines() if s.startswith("init loftq from the dense weights"))
    qlora, loftq = (
        float(x) for x in line.split("error ")[1].replace(" (QLoRA, B = 0) ->", "").split()
    )
    assert 0.05 < loftq < qlora < 0.2  # LoftQ's rank-4 correction lowers QLoRA's weight error
    assert (
        "lora r=4 on 12 layers: 37,634 trainable of 22,751,620 parameters" in shown
    )  # out x in counted
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["base"] == "nf4" and metrics["config"]["init"] == "kaiming"
    info = metrics["base_info"]
    assert (info["quantized_layers"], info["dense_layers"], info["block_size"]) == (37, {}, 64)
    assert info["loftq"]["error_loftq"] == pytest.approx(loftq, abs=1e-4)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.slow
@pytest.mark.parity
def test_an_nf4_run_loads_in_peft_and_merges_dense_or_requantized(nf4_run, tmp_path, capsys):
    from loraredux.base_format import convert_base_

    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    out, _ = nf4_run
    ours = minilm()
    convert_base_(ours, "nf4", keep=["classifier"])
    lx.load_adapter(ours, out)
    expected = logits(ours)
    with lx.disabled(ours):
        assert not torch.allclose(logits(ours), expected, atol=1e-4)
    theirs = peft.PeftModel.from_pretrained(minilm(quantized=True), out)
    torch.testing.assert_close(logits(theirs), expected, rtol=0, atol=1e-6)

    dense = tmp_path / "dense"
    assert main(["merge", str(out), "--out", str(dense), "--no-progress"]) == 0
    assert f"(as the run in {out} trained (metrics.json))" in capsys.readouterr().out
    plain = AutoModelForSequenceClassification.from_pretrained(dense).eval()
    assert not any(lx.quant.is_quantized(m) for m in plain.modules())
    torch.testing.assert_close(logits(plain), expected, rtol=1e-5, atol=1e-5)  # deq(Q) + the update

    requantized = tmp_path / "requantized"
    assert (
        main(["merge", str(out), "--out", str(requantized), "--requantize", "--no-progress"]) == 0
    )
    lines = [s.split() for s in capsys.readouterr().out.splitlines() if s.startswith("  bert.")]
    assert len(lines) == 12 and all(float(e) > 0 for _, e in lines)
    reloaded = no_repacking(AutoModelForSequenceClassification.from_pretrained(requantized))
    assert sum(lx.quant.format_of(m) == "nf4" for m in reloaded.modules()) == 37
    again = minilm()
    convert_base_(again, "nf4", keep=["classifier"])
    lx.load_adapter(again, out)
    with pytest.warns(UserWarning, match="requantizing the merged weights lost"):
        lx.quant.merge_requantized(again)
    torch.testing.assert_close(logits(reloaded), logits(again), rtol=0, atol=1e-6)
    assert (
        main(["merge", str(out), "--out", str(tmp_path / "x"), "--requantize", "--base", "fp32"])
        == 2
    )
    assert (
        "--requantize quantizes the merged layers back into a quantized base"
        in capsys.readouterr().err
    )


@pytest.mark.slow
def test_train_follows_an_nf4_recommendation_end_to_end(tmp_path, capsys):
    from loraredux.advisor.report import write_report
    from loraredux.tasks import build_task

    torch.manual_seed(0)
    model, task, _ = build_task("minilm", train_examples=64, eval_examples=16, batch_size=8,
                                max_length=32, progress=False)  # fmt: skip
    batches = [task.batches(i) for i in range(2)]
    rec = lx.advise(model, batches, task.loss_fn, targets=["query", "value"],
                    modules_to_save=["classifier"], budget="50MiB", progress=False)  # fmt: skip
    totals = {fmt: part["total"] for fmt, part in rec.memory.items()}
    assert totals["bf16"] > 50 << 20 >= totals["nf4"]  # only nf4 fits: the advice is NF4 with LoftQ
    assert (rec.base, rec.init) == ("nf4", "loftq")
    write_report(rec.to_dict(), tmp_path / "advice", plots=False)

    out = tmp_path / "run"
    argv = ["train", "--recommendation", str(tmp_path / "advice"), "--steps", "2", "--train-examples", "64",
            "--eval-examples", "16", "--batch-size", "8", "--max-length", "32", "--no-progress",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    shown = capsys.readouterr().out
    assert "base nf4: 37 linear layers quantized to nf4" in shown
    assert "init loftq from the dense weights before quantizing" in shown
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["base"] == "nf4" and "loftq" in metrics["base_info"]
    assert metrics["rank_pattern"] == rec.adapt_kwargs()["rank_pattern"]
    layers = lx.load_adapter(minilm(), out)  # a plain LoRA: it loads onto the dense model as well
    assert {p: a.config.rank for p, a in lx.adapters(layers)} == {
        p: a.rank for p, a in rec.layers.items()
    }
