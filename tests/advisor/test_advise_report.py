"""The advisor's report: every choice, layer, memory figure and verification number of a recommendation reaches the
Markdown and HTML reports, formatted as documented; the comparison with plain LoRA is computed; the Python it prints
applies the recommendation; the JSON round-trips; and an error writes nothing."""

from __future__ import annotations

import base64
import copy
import html
import json
import re
import sys
from html.parser import HTMLParser

import pytest
import torch

import loraredux as lx
from loraredux.advisor.report import (
    format_bytes,
    format_number,
    render_html,
    render_markdown,
    write_report,
)
from tiny_models import tiny_bert

MiB, GiB = 2**20, 2**30
L0Q = "bert.encoder.layer.0.attention.self.query"
L0V = "bert.encoder.layer.0.attention.self.value"
L1Q = "bert.encoder.layer.1.attention.self.query"
SHARED = "needed rank 5 fits under the default rank 8"
LESS = "needed rank 2 < 4: rank 4 is enough & saves memory"  # '<' and '&' must be escaped in HTML
UNMEASURED = "no gradient measured: the default rank"


def gradient(needed, noise, principal, minor):
    return {
        "singular_values": [0.9, 0.5, 0.2, 0.05, 0.01],
        "threshold": 0.1,
        "noise": noise,
        "needed_rank": needed,
        "effective_rank": 2.1,
        "stable_rank": 1.4,
        "principal_alignment": principal,
        "minor_alignment": minor,
    }


def weight(erank):
    return {
        "singular_values": [3.0, 2.0, 1.5, 1.0, 0.5, 0.1],
        "effective_rank": erank,
        "stable_rank": 2.4,
        "condition": 30.0,
    }


def recommendation():
    """Three tiny-BERT layers (the third without a gradient), a budget, and verification."""
    return {
        "loraredux_version": "0.1.0",
        "model": {
            "name": "minilm",
            "class": "BertForSequenceClassification",
            "parameters": 22788484,
        },
        "data": {"name": "rotten_tomatoes", "batches": 8, "batch_size": 16, "seq_len": 64},
        "choices": {
            "method": {
                "value": "lora",
                "reason": "every needed rank is small: plain LoRA suffices",
            },
            "rank": {
                "value": 8,
                "reason": "the largest needed rank, 5, rounded up to a power of two",
            },
            "alpha": {"value": 16, "reason": "alpha = 2 r, the usual scale"},
            "init": {"value": "pissa", "reason": "gradients align with W0's principal directions"},
            "optimizer": {"value": "adamw", "reason": "no sign that LoRA+ helps at this rank"},
            "base": {"value": "bf16", "reason": "bf16 fits the budget with room for activations"},
            "serving": {"value": "merge", "reason": "one adapter: merge it for serving"},
        },
        "config": {
            "method": "lora",
            "rank": 8,
            "alpha": 16,
            "dropout": 0.0,
            "rslora": False,
            "init": "pissa",
            "init_options": {},
        },
        "adapt": {
            "targets": ["query", "value"],
            "exclude": ["layer.1.attention.self.value"],
            "rank_pattern": {L0V: 4},
            "alpha_pattern": {},
            "modules_to_save": ["classifier"],
        },
        "layers": {
            L0Q: {
                "shape": [16, 16],
                "rank": 8,
                "init": "pissa",
                "reason": SHARED,
                "weight": weight(5.43),
                "gradient": gradient(5, 1.234e-5, 0.6213, 0.0412),
                "input_condition": 1234.5,
            },
            L0V: {
                "shape": [16, 16],
                "rank": 4,
                "init": "pissa",
                "reason": LESS,
                "weight": weight(4.8),
                "gradient": gradient(2, 3.5e-6, 0.5, 0.125),
                "input_condition": 87.25,
            },
            L1Q: {
                "shape": [16, 16],
                "rank": 8,
                "init": "pissa",
                "reason": SHARED,
                "weight": weight(6.02),
                "gradient": None,
                "input_condition": None,
            },
        },
        "memory": {
            "budget_bytes": 24 * GiB,
            "batch_size": 8,
            "seq_len": 512,
            "options": {
                "bf16": {
                    "base": 1536 * MiB,
                    "adapters": 3 * MiB,
                    "gradients": 3 * MiB,
                    "optimizer states": 6 * MiB,
                    "activations": 512 * MiB,
                    "total": 2060 * MiB,
                    "fits": True,
                },
                "nf4": {
                    "base": 400 * MiB,
                    "adapters": 3 * MiB,
                    "gradients": 3 * MiB,
                    "optimizer states": 6 * MiB,
                    "activations": None,
                    "total": 412 * MiB,
                    "fits": True,
                },
            },
            "chosen": "bf16",
        },
        "verify": {
            "metric": "accuracy",
            "higher_is_better": True,
            "steps": 125,
            "seed": 0,
            "runs": [
                run("advised", 8, "pissa", {L0V: 4}, 0.8125, 0.4123, 60.24, 74498),
                run("lora", 8, "kaiming", {}, 0.7875, 0.4561, 58.0, 76034),
                run("lora_r16", 16, "kaiming", {}, 0.815, 0.4012, 61.5, 150562),
            ],
        },
    }


def run(name, rank, init, pattern, metric, loss, seconds, trainable):
    config = {"method": "lora", "rank": rank, "alpha": 2 * rank, "init": init}
    return {
        "name": name,
        "config": config,
        "rank_pattern": pattern,
        "optimizer": "adamw",
        "lr": 0.004,
        "metric": metric,
        "train_loss": loss,
        "seconds": seconds,
        "trainable": trainable,
    }


def weights_only():
    """No data (so no gradient), no verification, no budget, all-linear targets and no per-layer ranks."""
    rec = recommendation()
    rec["data"] = None
    rec["verify"] = None
    rec["memory"]["budget_bytes"] = None
    for layer in rec["layers"].values():
        layer["gradient"] = None
        layer["input_condition"] = None
        layer["rank"] = 8
        layer["reason"] = UNMEASURED
    rec["adapt"] = {
        "targets": "all-linear",
        "exclude": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
    }
    return rec


def table_row(text, first_cell):
    """The cells of the Markdown table row whose first cell starts with `first_cell`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("|") and cells[0].startswith(first_cell):
            return cells
    raise AssertionError(f"no row {first_cell!r}")


VOID = {"meta", "img", "br", "hr", "link", "input"}  # elements without a closing tag


class Strict(HTMLParser):
    """Fails on a closing tag that does not match the open one; records the open tags and the images."""

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(page):
    parser = Strict()
    parser.feed(page)
    parser.close()
    assert parser.stack == [], f"unclosed tags {parser.stack}"
    return parser


# ----------------------------------------------------------------------------------------------- formatting


def test_bytes_and_numbers_are_formatted_compactly():
    assert format_bytes(1536 * MiB) == "1.50 GiB"
    assert format_bytes(3 * MiB) == "3.00 MiB"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(24 * GiB) == "24.00 GiB"
    assert format_bytes(3 * 2**40) == "3.00 TiB"
    assert format_bytes(None) == "—"
    assert format_number(0.0123) == "0.0123"
    assert format_number(1.234e-5) == "1.23e-5"
    assert format_number(1234.5) == "1.23e3"
    assert format_number(5.43) == "5.43"
    assert format_number(231.4) == "231"
    assert format_number(7) == "7"
    assert format_number(float("inf")) == "∞"
    assert format_number(None) == "—"


# ----------------------------------------------------------------------------------------------- Markdown


def test_markdown_holds_every_choice_with_its_value_and_reason():
    rec = recommendation()
    text = render_markdown(rec)
    assert text.startswith("# Adapter advice: minilm on rotten_tomatoes\n")
    for name, choice in rec["choices"].items():
        assert table_row(text, name) == [name, f"`{choice['value']}`", choice["reason"]]


def test_markdown_layer_table_and_reasons_listed_once():
    text = render_markdown(recommendation())
    assert table_row(text, f"`{L0Q}`") == [
        f"`{L0Q}`", "16×16", "8", "pissa", "5", "0.1", "1.23e-5", "0.621 / 0.0412", "5.43", "1.23e3"
    ]  # fmt: skip
    assert table_row(text, f"`{L0V}`")[2:] == [
        "4",
        "pissa",
        "2",
        "0.1",
        "3.5e-6",
        "0.5 / 0.125",
        "4.8",
        "87.2",
    ]
    assert table_row(text, f"`{L1Q}`")[2:] == ["8", "pissa", "—", "—", "—", "—", "6.02", "—"]
    # the reasons are not a column: each is listed once below the table with its layers
    assert text.count(SHARED) == 1 and text.count(LESS) == 1
    assert f"- `{L0Q}`, `{L1Q}`: {SHARED}\n" in text
    assert f"- `{L0V}`: {LESS}\n" in text
    assert (
        "ranks 4 to 8 (1 layer off the config's r = 8: 2 of 3 layers; layer ranks 4-8, median 8)"
        in text
    )
    assert "the gradient was measured on 2 of them" in text


def test_markdown_memory_table_in_binary_units_with_budget_and_choice():
    text = render_markdown(recommendation())
    head = table_row(text, "base format")
    assert head == ["base format", "base", "adapters", "gradients", "optimizer states", "activations",
                    "total", "fits"]  # fmt: skip
    bf16 = table_row(text, "**bf16**")
    assert bf16 == ["**bf16** (chosen)", "1.50 GiB", "3.00 MiB", "3.00 MiB", "6.00 MiB", "512.00 MiB",
                    "2.01 GiB", "yes"]  # fmt: skip
    assert table_row(text, "nf4") == ["nf4", "400.00 MiB", "3.00 MiB", "3.00 MiB", "6.00 MiB", "—",
                                      "412.00 MiB", "yes"]  # fmt: skip
    assert "against a budget of **24.00 GiB**" in text and "1 GiB = 1024 MiB" in text
    assert "batches of 8 × 512 tokens" in text
    assert "no budget was set" in render_markdown(weights_only())


def test_verification_marks_the_best_run_and_computes_the_difference_with_plain_lora():
    rec = recommendation()
    text = render_markdown(rec)
    assert table_row(text, "advised") == ["advised", "lora, r=8, α=16, init=pissa, 1 per-layer rank, adamw, "
                                          "lr 0.004", "0.8125", "0.4123", "60.2", "74,498"]  # fmt: skip
    assert table_row(text, "lora")[0] == "lora"
    assert (
        table_row(text, "**lora_r16**")[0] == "**lora_r16** (best)"
    )  # 0.815 beats the advised 0.8125
    assert text.count("(best)") == 1
    diff = 0.8125 - 0.7875
    assert f"a difference of {diff:+.3g} (higher is better)" in text
    # one seed: no difference is evidence, whichever way it goes
    assert "(seed 0; one seed, so no difference below is evidence)" in text
    assert (
        "+0.025 (higher is better), within seed noise: only one seed (0) was run, so the seed-to-seed spread "
        "is unmeasured and no difference counts as evidence (`--seeds 2` or more measures it)."
    ) in text
    assert "did better" not in text
    # ... and an alternative that beat the advice is named
    assert (
        "`lora_r16` beat the advice: accuracy 0.815 against 0.8125 (+0.0025), within seed noise"
        in text
    )
    # with a lower-is-better metric the same numbers put the advice behind, and the best run is the lowest
    rec["verify"]["higher_is_better"] = False
    rec["verify"]["metric"] = "perplexity"
    text = render_markdown(rec)
    assert "+0.025 (lower is better), within seed noise: only one seed" in text
    assert "`lora` beat the advice" not in text  # plain LoRA is the sentence before
    assert "lora_r16` beat" not in text
    assert table_row(text, "**lora**")[0] == "**lora** (best)" and text.count("(best)") == 1


def seeded(rec, metrics):
    """The verification of `rec` over seeds 0, 1: {run name: (seed 0 metric, seed 1 metric)}."""
    rec["verify"]["seeds"] = [0, 1]
    for run in rec["verify"]["runs"]:
        values = metrics[run["name"]]
        run["per_seed"] = {"0": values[0], "1": values[1]}
        run["metric"] = sum(values) / 2
    return rec


def test_over_two_seeds_only_a_difference_beyond_the_spread_is_evidence():
    # plain LoRA 0.02 behind, spreads 0.01 and 0.004: evidence; lora_r16 0.004 ahead, spread 0.012: noise
    rec = seeded(recommendation(), {"advised": (0.81, 0.82), "lora": (0.79, 0.794),
                                    "lora_r16": (0.813, 0.825)})  # fmt: skip
    text = render_markdown(rec)
    assert (
        "(seeds 0, 1; each accuracy is the mean over the seeds and the seconds their sum)" in text
    )
    assert (
        "a difference of +0.023 (higher is better), so the advice did better than plain LoRA: over 2 seeds the "
        "difference of the means exceeds the larger seed spread of the two runs, 0.01."
    ) in text
    assert (
        "`lora_r16` beat the advice: accuracy 0.819 against 0.815 (+0.004), within seed noise: over 2 seeds the "
        "difference of the means does not exceed the larger seed spread of the two runs, 0.012"
    ) in text
    assert "mean of seeds 0: 0.81; 1: 0.82 (spread 0.01)" in table_row(text, "advised")[1]
    # a difference inside the spread is noise; an alternative beyond it is to be preferred
    rec = seeded(recommendation(), {"advised": (0.80, 0.82), "lora": (0.795, 0.815),
                                    "lora_r16": (0.85, 0.86)})  # fmt: skip
    text = render_markdown(rec)
    assert "+0.005 (higher is better), within seed noise: over 2 seeds" in text
    assert (
        "`lora_r16` beat the advice: accuracy 0.855 against 0.81 (+0.045), beyond the larger seed spread of "
        "the two, 0.02: prefer it."
    ) in text
    # the same sentences for the command line
    from loraredux.advisor.verdicts import compare_runs

    assert " ".join(compare_runs(rec["verify"])) in text
    assert compare_runs(None) == []


def test_each_memory_figure_says_what_it_counts():
    rec = recommendation()
    rec["memory"]["device"] = "cuda"
    rec["verify"]["memory"] = {
        "device": "cpu", "batch_size": 8, "seq_len": 64, "measured": 300 * MiB, "estimated": 303 * MiB,
        "ratio": 1.01, "estimated_parts": {"activations": 200 * MiB},
    }  # fmt: skip
    text = render_markdown(rec)
    assert (
        "The memory model's estimate (not a measurement) of training LoRA at the advised ranks, per base format: "
        "the base weights at that format, the adapters, their gradients and optimizer states, and the "
        "activations of one training step on batches of 8 × 512 tokens, for training on cuda"
    ) in text
    assert (
        "one training step of the advised model as the verification trains it (batch 8 × 64 tokens, fp32 base, "
        "cpu; weights, adapters, gradients, optimizer states and activations) measured 300.00 MiB; the memory "
        "model's estimate for that same step is 303.00 MiB, 1.010 times the measurement. It is a different "
        "figure from the Memory section's estimate for the chosen base, 2.01 GiB at bf16: that one is for the "
        "training setup the advice was given, and differs from this step in the device (cuda there, cpu here: "
        "the activations depend on the attention kernel each device runs), the batch (8 × 512 tokens there), "
        "the base format (bf16 there, fp32 here) (activations 200.00 MiB here, 512.00 MiB there)."
    ) in text
    # the same setup is named as such
    rec["verify"]["memory"].update(device="cuda", seq_len=512)
    rec["memory"]["chosen"] = "fp32"
    rec["memory"]["options"]["fp32"] = {**rec["memory"]["options"]["bf16"], "total": 302 * MiB}
    assert (
        "The Memory section's estimate at fp32, 302.00 MiB, is for the same setup"
        in render_markdown(rec)
    )


def test_a_reason_shared_by_layers_is_said_once_with_its_layers():
    rec = recommendation()
    init = "kaiming (B = 0): the loss passes through a newly drawn head, a long reason"
    for layer in rec["layers"].values():
        layer["rank_reason"] = f"rank {layer['rank']}: measured"
        layer["init_reason"] = init
        layer["reason"] = f"{layer['rank_reason']}. {init}."
    text = render_markdown(rec)
    assert text.count(init) == 1 and f"Why each layer's init:\n\n- All 3 layers: {init}\n" in text
    assert (
        f"Why each layer's rank:\n\n- `{L0Q}`, `{L1Q}`: rank 8: measured\n- `{L0V}`: rank 4: measured\n"
        in text
    )


def test_ranks_that_are_their_measured_need_share_one_explanation_and_keep_their_numbers():
    from loraredux.advisor.report import GAVISH_DONOHO

    rec = recommendation()
    rec["layers"][L0Q]["gradient"]["needed_rank"] = 8  # rank 8: exactly what its gradient needs
    rec["layers"][L0V]["gradient"]["needed_rank"] = 4
    rec["layers"][L0V]["gradient"]["threshold"] = 0.0371
    for layer in rec["layers"].values():
        layer["rank_reason"] = (
            f"rank {layer['rank']}: {layer['rank']} singular values above τ = ..."
        )
        layer["init_reason"] = "pissa: aligned"
    rec["layers"][L1Q]["rank_reason"] = "rank 8: no calibration data"  # no gradient: its own reason
    text = render_markdown(rec)
    assert (
        f"Why each layer's rank:\n\n- `{L0Q}`, `{L0V}`: {GAVISH_DONOHO}\n- `{L1Q}`: rank 8: no "
        in text
    )
    assert "singular values above τ = ..." not in text
    assert f"| `{L0V}` | 16×16 | 4 | pissa | 4 | 0.0371 |" in text  # the threshold has its column
    rec["layers"][L0Q]["rank_reason"] = "rank 8, capped: 9 singular values ...; the cap is 8"
    assert "- `{L0Q}`: rank 8, capped".replace("{L0Q}", L0Q) in render_markdown(rec)


def test_no_data_and_no_verification():
    text = render_markdown(weights_only())
    assert text.startswith("# Adapter advice: minilm\n")
    assert "without calibration data" in text and "no gradient was measured" in text
    assert "## Verification" not in text and "(best)" not in text
    assert table_row(text, f"`{L0Q}`")[4:] == ["—", "—", "—", "—", "5.43", "—"]
    assert f"- All 3 layers: {UNMEASURED}\n" in text


def test_what_lx_advise_leaves_out_without_the_command_line():
    """`lx.advise` called from Python: no model or data name, no memory estimate (no transformers config)."""
    rec = recommendation()
    del rec["model"]["name"], rec["data"]["name"]
    rec["memory"] = None
    rec["adapt"]["rank_pattern"] = rec["adapt"]["alpha_pattern"] = None
    text = render_markdown(rec)
    assert text.startswith("# Adapter advice: a model\n")
    assert "measured on 8 batches of 16 × 64 tokens." in text
    assert "## Memory\n\nNo memory estimate was made.\n" in text
    assert "```sh" not in text  # no model name: no command
    assert "rank_pattern" not in code_block(text, "python")
    parse(render_html(rec))


# ----------------------------------------------------------------------------------------------- how to use it


def code_block(text, lang):
    blocks = re.findall(rf"```{lang}\n(.*?)\n```", text, flags=re.S)
    assert len(blocks) == 1, blocks
    return blocks[0]


def test_the_printed_python_applies_the_recommendation():
    rec = recommendation()
    text = render_markdown(rec)
    code = code_block(text, "python")
    assert "lx.config_from_dict(" in code and "rank_pattern=" in code
    model = tiny_bert()
    exec(code, {"model": model})
    assert {path: a.config.rank for path, a in lx.adapters(model)} == {L0Q: 8, L0V: 4, L1Q: 8}
    assert all(a.config.init == "pissa" for _, a in lx.adapters(model))
    # the command line applies the same file, per-layer ranks included
    command = code_block(text, "sh").replace("\\\n", "").split()
    assert command[:2] == ["loraredux", "train"] and command[-2:] == ["--lr", "0.004"]
    assert "--recommendation" in command and command[command.index("--recommendation") + 1] == (
        "DIR/recommendation.json"
    )
    # a data-aware init needs calibration batches, and the call says so
    rec["config"]["init"] = "lora_ga"
    assert "    calibration=batches,  # training batches: init 'lora_ga'" in render_markdown(rec)


def test_the_printed_python_quantizes_a_dense_model_and_starts_loftq_from_its_weights():
    pytest.importorskip("bitsandbytes")
    rec = recommendation()
    rec["choices"]["base"]["value"] = "nf4"
    rec["config"]["init"] = "loftq"
    text = render_markdown(rec)
    assert "the first lines quantize its base to **nf4**" in text
    code = code_block(text, "python")
    assert "convert_base_(model, 'nf4', keep=['classifier'], keep_weights=True)" in code
    model = tiny_bert(hidden_size=64, num_attention_heads=4, intermediate_size=128).float()
    W0 = model.get_submodule(L0Q).weight.detach().clone()
    exec(code, {"model": model})
    layer = model.get_submodule(L0Q)
    assert layer.view.format == "nf4" and layer.config.rank == 8
    A, B, s = layer.lora_form()
    residual = W0 - lx.quant.dequantize(
        layer.base
    )  # LoftQ: the best rank-8 part of the quantization error
    U, S, Vh = torch.linalg.svd(residual.double())
    torch.testing.assert_close((s * B @ A).double(), (U[:, :8] * S[:8]) @ Vh[:8], rtol=0, atol=1e-5)
    assert "and puts the base in nf4 as `--base nf4` does" in text


def test_the_command_line_applies_the_written_recommendation(tmp_path):
    text = render_markdown(weights_only(), folder="runs/advice")
    command = code_block(text, "sh").replace("\\\n", "").split()
    assert command == ["loraredux", "train", "--model", "minilm", "--recommendation",
                       "runs/advice/recommendation.json"]  # fmt: skip
    assert "and puts the base in bf16 as `--base bf16` does" in text
    code = code_block(text, "python")
    assert "targets='all-linear'" in code and "rank_pattern" not in code
    model = tiny_bert()
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    exec(code, {"model": model})
    assert {path for path, _ in lx.adapters(model)} == linear - {
        "classifier"
    }  # not the output head
    # with verification, the command takes the learning rate the advised run was verified with
    rec = weights_only()
    rec["verify"] = recommendation()["verify"]
    text = render_markdown(rec)
    assert code_block(text, "sh").split()[-2:] == ["--lr", "0.004"]
    assert "the learning rate is the one the verification used" in text
    # write_report names the folder it writes to
    write_report(rec, tmp_path / "advice", plots=False)
    assert f"--recommendation {tmp_path}/advice/recommendation.json" in (
        tmp_path / "advice" / "report.md"
    ).read_text().replace("\\\n    ", "")


# ----------------------------------------------------------------------------------------------- HTML


def test_html_is_well_formed_escaped_and_holds_the_same_content():
    rec = recommendation()
    rec["choices"]["rank"]["reason"] = "needed rank <= 5 for every layer"
    page = render_html(rec, {})
    parser = parse(page)
    assert parser.images == []
    assert html.escape(LESS) in page and LESS not in page  # "&lt;" and "&amp;", never the raw text
    assert "needed rank &lt;= 5 for every layer" in page
    text = "".join(parser.text)  # what a reader sees: the raw text back
    for name, choice in rec["choices"].items():
        assert choice["reason"] in text and name in text
    for path in rec["layers"]:
        assert path in text
    assert "1.50 GiB" in text and "+0.025 (higher is better)" in text and "lora_r16 (best)" in text


# ----------------------------------------------------------------------------------------------- files


def test_write_report_files_with_plots(tmp_path):
    pytest.importorskip("matplotlib")
    rec = recommendation()
    paths = write_report(rec, tmp_path / "advice")
    names = [p.name for p in paths]
    assert names == ["recommendation.json", "report.md", "report.html", "spectra.png", "ranks.png",
                     "memory.png", "verify.png"]  # fmt: skip
    assert all(p.is_file() and p.parent == tmp_path / "advice" for p in paths)
    assert sorted(p.name for p in (tmp_path / "advice").iterdir()) == sorted(
        names
    )  # no temp file left
    raw = (tmp_path / "advice" / "recommendation.json").read_text()
    assert json.loads(raw) == rec and raw == json.dumps(rec, indent=2) + "\n"
    for p in paths[3:]:
        assert p.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    text = (tmp_path / "advice" / "report.md").read_text()
    assert text == render_markdown(rec, names[3:], str(tmp_path / "advice"))
    for name in names[3:]:
        assert f"]({name})" in text
    parser = parse((tmp_path / "advice" / "report.html").read_text())
    embedded = [a["src"] for a in parser.images]
    assert len(embedded) == 4
    assert [base64.b64decode(s.split(",", 1)[1]) for s in embedded] == [
        p.read_bytes() for p in paths[3:]
    ]


def test_write_report_without_plots_or_data(tmp_path):
    rec = weights_only()
    paths = write_report(rec, tmp_path, plots=False)
    assert [p.name for p in paths] == ["recommendation.json", "report.md", "report.html"]
    assert json.loads(paths[0].read_text()) == rec
    assert ".png" not in paths[1].read_text()
    assert parse(paths[2].read_text()).images == []


def test_plots_of_a_recommendation_without_gradients_or_memory(tmp_path):
    pytest.importorskip("matplotlib")
    rec = weights_only()
    paths = write_report(rec, tmp_path)
    assert [p.name for p in paths[3:]] == ["spectra.png", "ranks.png", "memory.png"]
    rec["memory"] = None
    paths = write_report(rec, tmp_path / "no-memory")
    assert [p.name for p in paths[3:]] == ["spectra.png", "ranks.png"]


@pytest.mark.parametrize("key", ["choices", "config", "adapt", "layers", "memory"])
def test_a_missing_key_writes_nothing(tmp_path, key):
    (tmp_path / "report.md").write_text("an earlier report\n")
    rec = recommendation()
    del rec[key]
    with pytest.raises(ValueError, match=repr(key)):
        write_report(rec, tmp_path)
    with pytest.raises(ValueError, match=repr(key)):
        render_markdown(rec)
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]
    assert (tmp_path / "report.md").read_text() == "an earlier report\n"


def test_plots_without_matplotlib_say_what_to_do_and_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    rec = recommendation()
    with pytest.raises(ImportError, match=re.escape("pip install loraredux[bench]")):
        write_report(rec, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert write_report(copy.deepcopy(rec), tmp_path / "out", plots=False)[0].is_file()
