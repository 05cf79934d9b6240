"""User models outside image classification, as a user brings them: each form a factory
(`benchmarks.user_forms:NAME`, fixed-seed random weights, BatchNorm statistics from random inputs)
run with defaults only, no data (sqexport's seeded synthetic inputs), and a table of what came out:
exit code, int8 / weight layers, the FP32 layers' reasons, latency vs FP32.

    .venv/bin/python benchmarks/user_forms.py                 # all forms, ~3 min on 2 cores
    .venv/bin/python benchmarks/user_forms.py --form unet,video3d
    sqexport benchmarks.user_forms:unet --input-shape 1x3x64x64 -o out   # one of them by hand

What each form once broke is in CHANGELOG.md (2026-12-07) and benchmarks/results/user-forms.md.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _seeded(cls, dtype=None):
    def make():
        torch.manual_seed(0)
        m = cls()
        m.train()  # BatchNorm statistics from random inputs, so the norms fold into something non-trivial
        with torch.no_grad():
            for _ in range(4):
                m(*m.sample())
        m = m.eval()
        return m.to(dtype) if dtype is not None else m
    return make

class Audio1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(40, 64, 3, padding=1), nn.BatchNorm1d(64), nn.GELU())
        self.dw = nn.Sequential(nn.Conv1d(64, 64, 5, padding=2, groups=64), nn.BatchNorm1d(64), nn.ReLU(),
                                nn.Conv1d(64, 128, 1), nn.BatchNorm1d(128), nn.ReLU())
        self.head = nn.Linear(128, 12)

    def sample(self):
        return (torch.randn(8, 40, 100),)

    def forward(self, x):
        x = self.dw(self.stem(x))
        return self.head(F.adaptive_avg_pool1d(x, 1).flatten(1))


class UNetTiny(nn.Module):
    def __init__(self):
        super().__init__()
        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True))
        self.e1, self.e2 = block(3, 16), block(16, 32)
        self.mid = block(32, 64)
        self.up2 = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.d2 = block(64, 32)
        self.up1 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.d1 = block(32, 16)
        self.out = nn.Conv2d(16, 4, 1)

    def sample(self):
        return (torch.randn(4, 3, 64, 64),)

    def forward(self, x):
        a = self.e1(x)
        b = self.e2(F.max_pool2d(a, 2))
        m = self.mid(F.max_pool2d(b, 2))
        y = self.d2(torch.cat([self.up2(m), b], 1))
        y = self.d1(torch.cat([self.up1(y), a], 1))
        return self.out(y)


class GroupNormRes(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.n1, self.c1 = nn.GroupNorm(8, 32), nn.Conv2d(32, 32, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(8, 32), nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def sample(self):
        return (torch.randn(4, 3, 32, 32),)

    def forward(self, x):
        x = self.stem(x)
        h = self.c1(F.silu(self.n1(x)))
        h = self.c2(F.silu(self.n2(h)))
        x = x + h
        return self.fc(x.mean((2, 3)))


class Tabular(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 128), nn.LayerNorm(128), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 5))

    def sample(self):
        return (torch.randn(16, 32),)

    def forward(self, x):
        return self.net(x)


class LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 32)
        self.lstm = nn.LSTM(32, 48, batch_first=True)
        self.fc = nn.Linear(48, 6)

    def sample(self):
        return (torch.randn(4, 20, 8),)

    def forward(self, x):
        out, _ = self.lstm(torch.relu(self.proj(x)))
        return self.fc(out[:, -1])


class SuperRes(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 5, padding=2)
        self.c2 = nn.Conv2d(32, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 4, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def sample(self):
        return (torch.randn(2, 1, 32, 32),)

    def forward(self, x):
        y = torch.tanh(self.c1(x))
        y = torch.tanh(self.c2(y))
        return self.shuffle(self.c3(y)) + F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class Video3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv3d(3, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv3d(16, 32, 3, stride=2, padding=1), nn.BatchNorm3d(32), nn.ReLU())
        self.fc = nn.Linear(32, 7)

    def sample(self):
        return (torch.randn(2, 3, 8, 32, 32),)

    def forward(self, x):
        return self.fc(self.c2(self.c1(x)).mean((2, 3, 4)))


class InstanceNormStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 16, 9, padding=4), nn.InstanceNorm2d(16, affine=True)
        self.c2, self.n2 = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.InstanceNorm2d(32, affine=True)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.c3 = nn.Conv2d(32, 3, 3, padding=1)

    def sample(self):
        return (torch.randn(2, 3, 64, 64),)

    def forward(self, x):
        y = F.relu(self.n1(self.c1(x)))
        y = F.relu(self.n2(self.c2(y)))
        return torch.sigmoid(self.c3(self.up(y)))


class MultiInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.meta = nn.Linear(4, 16)
        self.fc = nn.Linear(32, 3)

    def sample(self):
        return (torch.randn(4, 3, 32, 32), torch.randn(4, 4))

    def forward(self, image, meta):
        a = self.conv(image).mean((2, 3))
        return self.fc(torch.cat([a, torch.relu(self.meta(meta))], 1))



class TextCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.conv = nn.Conv1d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 4)

    def sample(self):
        return (torch.randint(0, 100, (4, 12)),)

    def forward(self, tokens):
        x = self.emb(tokens).transpose(1, 2)
        return self.fc(torch.relu(self.conv(x)).amax(2))





class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def sample(self):
        return (torch.randn(4, 3, 32, 32),)

    def forward(self, x):
        return self.fc(self.c2(self.c1(x)).mean((2, 3)))


class SDPANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.proj = nn.Linear(32, 32)
        self.ln = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 5)

    def sample(self):
        return (torch.randn(4, 16, 32),)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.ln(x)).reshape(b, n, 3, 4, c // 4).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, c))
        e = torch.einsum("bnc,bmc->bnm", x, x).softmax(-1)
        x = torch.einsum("bnm,bmc->bnc", e, x)
        return self.fc(x.mean(1))











class ActZoo(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act = act
        chans = [3, 32, 64, 64, 128]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2 if i % 2 else 1, padding=1) for i, (a, b) in enumerate(zip(chans, chans[1:])))
        self.bns = nn.ModuleList(nn.BatchNorm2d(b) for b in chans[1:])
        self.acts = nn.ModuleList(act() for _ in chans[1:])
        self.fc = nn.Linear(128, 10)

    def sample(self):
        return (torch.randn(4, 3, 64, 64),)

    def forward(self, x):
        for c, b, a in zip(self.convs, self.bns, self.acts):
            x = a(b(c(x)))
        return self.fc(x.mean((2, 3)))


class TwoHeads(SmallCNN):
    def __init__(self):
        super().__init__()
        self.box = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        f = self.c2(self.c1(x))
        return self.fc(f.mean((2, 3))), self.box(f)


class Detector(SmallCNN):  # boxes first, then scores
    def __init__(self):
        super().__init__()
        self.box = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        f = self.c2(self.c1(x))
        return self.box(f).flatten(2).transpose(1, 2), self.fc(f.mean((2, 3))).sigmoid()


def _act(act):
    class Net(ActZoo):
        def __init__(self):
            super().__init__(act)
    return _seeded(Net)


audio1d = _seeded(Audio1d)
unet = _seeded(UNetTiny)
groupnorm = _seeded(GroupNormRes)
tabular = _seeded(Tabular)
lstm = _seeded(LSTMClassifier)
superres = _seeded(SuperRes)
video3d = _seeded(Video3d)
instnorm = _seeded(InstanceNormStyle)
multi = _seeded(MultiInput)
textcnn = _seeded(TextCNN)
sdpa = _seeded(SDPANet)
twoheads = _seeded(TwoHeads)
detector = _seeded(Detector)
half_cnn = _seeded(SmallCNN, torch.float16)
bf16_cnn = _seeded(SmallCNN, torch.bfloat16)
prelu = _act(nn.PReLU)
mish = _act(nn.Mish)
elu = _act(nn.ELU)


def hf_tiny_bert():
    """A Hugging Face classifier built in a factory (no folder, no tokenizer): ids in, ModelOutput out."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


# name -> (--input-shape value, what it is)
FORMS = {
    "audio1d": ("1x40x100", "Conv1d + BatchNorm1d + GELU, depthwise 1-D (keyword spotting)"),
    "unet": ("1x3x64x64", "U-Net: ConvTranspose upsampling, skip concatenations, 4-D output"),
    "groupnorm": ("1x3x32x32", "GroupNorm + SiLU residual block (diffusion style)"),
    "tabular": ("1x32", "MLP with LayerNorm and Dropout"),
    "lstm": ("1x20x8", "LSTM sequence classifier"),
    "superres": ("1x1x32x32", "PixelShuffle + bilinear skip (super-resolution)"),
    "video3d": ("1x3x8x32x32", "Conv3d + BatchNorm3d (video)"),
    "instnorm": ("1x3x64x64", "InstanceNorm + nearest upsampling (style transfer)"),
    "multi": ("image=1x3x32x32,meta=1x4", "two inputs; a child module named `meta`"),
    "textcnn": ("1x12", "token ids -> nn.Embedding -> Conv1d"),
    "hf_tiny_bert": ("input_ids=1x16", "transformers BertForSequenceClassification from a config"),
    "sdpa": ("1x16x32", "scaled_dot_product_attention and einsum attention"),
    "twoheads": ("1x3x32x32", "two outputs: logits and a box map"),
    "detector": ("1x3x32x32", "boxes (N, HW, 4) first, sigmoid scores second"),
    "half_cnn": ("1x3x32x32", "a CNN held in float16"),
    "bf16_cnn": ("1x3x32x32", "a CNN held in bfloat16"),
    "prelu": ("1x3x64x64", "4 conv blocks with PReLU"),
    "mish": ("1x3x64x64", "4 conv blocks with Mish"),
    "elu": ("1x3x64x64", "4 conv blocks with ELU"),
}


def _fp32_reasons(rep: dict) -> str:
    fp32 = rep.get("quantization", {}).get("coverage", {}).get("fp32", [])
    kinds = Counter(f["reason"].split(":")[0] if f["op"] in ("ConvTranspose", "LSTM", "GRU", "RNN")
                    else ("speed check" if f["reason"].startswith("kept FP32 for speed") else f["reason"][:40])
                    for f in fp32)
    return ", ".join(f"{n} {k}" for k, n in kinds.items()) or "-"


def run_form(name: str, work: Path) -> dict:
    from benchmarks._common import run_sqexport
    shape, what = FORMS[name]
    t0 = time.perf_counter()
    try:
        code, rep = run_sqexport(f"benchmarks.user_forms:{name}", ["--input-shape", shape, "--quiet"], work / name)
    except RuntimeError as exc:
        return {"form": name, "what": what, "exit": "error", "error": str(exc).splitlines()[-1]}
    cov = rep["quantization"]["coverage"]
    acc = rep["accuracy"]
    return {"form": name, "what": what, "exit": code, "seconds": round(time.perf_counter() - t0, 1),
            "int8": cov["int8"], "weight_layers": cov["weight_layers"], "fp32": _fp32_reasons(rep),
            "metric": acc["metric"], "drop": acc["drop"], "sparsity": rep.get("sparsity", {}).get("overall"),
            "x_fp32_1_thread": rep["latency_ms"]["at_1_thread"]["speedup"],
            "precision": rep["source"].get("precision", {}).get("from")}


def main(argv=None) -> None:
    from benchmarks._common import machine_info, markdown_table, project_revision, write_results
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--form", default=",".join(FORMS), help="comma-separated names of FORMS")
    parser.add_argument("--results", default="user-forms", help="results/<NAME>.md and .json")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.form.split(",") if n.strip()]
    unknown = [n for n in names if n not in FORMS]
    if unknown:
        parser.error(f"unknown form(s) {', '.join(unknown)}; known: {', '.join(FORMS)}")
    machine = machine_info()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows.append(run_form(name, Path(tmp)))
    table = markdown_table(
        ["form", "what", "exit", "int8 / weight layers", "FP32 layers", "drop", "x FP32 (1 thread)"],
        [[r["form"], r["what"], r["exit"], f"{r.get('int8', '-')} / {r.get('weight_layers', '-')}", r.get("fp32", r.get("error")),
          f"{r['drop']:.3g} ({r['metric']})" if "drop" in r else "-",
          f"{r['x_fp32_1_thread']:.2f}" if "x_fp32_1_thread" in r else "-"] for r in rows])
    print(table)
    flags = ", ".join(machine["isa"])
    md = (f"# User models outside image classification, defaults only ({machine['cpu']}; {flags})\n\n"
          f"revision {project_revision()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          "`sqexport benchmarks.user_forms:NAME --input-shape SHAPE`, no data (seeded synthetic inputs), "
          "default pruning and gate.\n\n" + table)
    write_results(args.results, {"machine": machine, "rows": rows}, md)


if __name__ == "__main__":
    main()
