"""Write the example jobs' offline data: your own files in the shapes swarmnode reads, made from data already on
this machine (scikit-learn's bundled datasets, this Python's own documentation strings). Nothing is downloaded.

    python examples/prepare_data.py tables --nodes 3      # examples/data/wine-<i>.csv: each node's own rows
    python examples/prepare_data.py images --nodes 3      # examples/data/digits-<i>/<digit>/*.png
    python examples/prepare_data.py text --nodes 2        # examples/data/docs-<i>/*.txt: one document per file
    python examples/prepare_data.py gpt2                  # examples/data/tiny-gpt2/: a small pretrained causal LM

Then bind each node's part to the job's dataset name (its files stay where they are) and submit, e.g.

    swarmnode data add wine examples/data/wine-0.csv --format csv --label cultivar --home ~/.swarmnode/n0
    swarmnode submit examples/wine_csv.toml --follow
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

OUT = pathlib.Path(__file__).resolve().parent / "data"


def tables(nodes: int, out: pathlib.Path) -> None:
    """scikit-learn's wine (178 wines, 13 measurements, 3 cultivars), standardised, dealt to ``nodes`` CSVs."""
    from sklearn.datasets import load_wine

    wine = load_wine()
    x = (wine.data - wine.data.mean(0)) / wine.data.std(0)
    names = [n.replace("/", "_") for n in wine.feature_names]
    order = np.random.default_rng(0).permutation(len(x))
    for i, part in enumerate(np.array_split(order, nodes)):
        path = out / f"wine-{i}.csv"
        with open(path, "w") as f:
            f.write(",".join(names) + ",cultivar\n")
            for j in part:
                f.write(",".join(f"{v:.5f}" for v in x[j]) + f",{wine.target_names[wine.target[j]]}\n")
        print(f"wrote {path} ({len(part)} rows)")
    print("features = [" + ", ".join(f'"{n}"' for n in names) + "]")


def images(nodes: int, out: pathlib.Path) -> None:
    """scikit-learn's 1797 8x8 digits as greyscale PNGs, one subfolder per digit, dealt to ``nodes`` folders."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    for i, part in enumerate(np.array_split(order, nodes)):
        for j in part:
            folder = out / f"digits-{i}" / str(digits.target[j])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((digits.images[j] * 255 / 16).astype(np.uint8)).save(folder / f"{j}.png")
        print(f"wrote {out / f'digits-{i}'} ({len(part)} images)")


def text(nodes: int, out: pathlib.Path) -> None:
    """The docstrings of this Python's standard library modules, one document per module, dealt to ``nodes``."""
    import pkgutil

    docs = []
    for info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in ("antigravity", "this", "idlelib", "tkinter", "turtle"):
            continue
        spec = info.module_finder.find_spec(info.name, None) if hasattr(info.module_finder, "find_spec") else None
        origin = getattr(spec, "origin", None) or ""
        if "site-packages" in origin or not origin.endswith(".py"):
            continue
        source = pathlib.Path(origin).read_text(errors="replace")
        start = source.find('"""')
        end = source.find('"""', start + 3)
        if start >= 0 and end - start > 400:
            docs.append((info.name, source[start + 3:end].strip()))
    for i in range(nodes):
        folder = out / f"docs-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, doc in docs[i::nodes]:
            (folder / f"{name}.txt").write_text(doc + "\n")
        print(f"wrote {folder} ({len(docs[i::nodes])} documents)")


def gpt2(out: pathlib.Path, steps: int) -> None:
    """A small GPT-2 (byte vocabulary, 4 layers) pretrained for ``steps`` AdamW steps on this Python's standard
    library sources (the bundled pystdlib-bytes corpus), saved with save_pretrained: a stand-in for your own
    pretrained causal-LM folder, so that the LoRA example fine-tunes a model that already knows some text."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from node.ml.datasets import load_dataset

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=128, n_embd=128, n_layer=4, n_head=4,
                                       bos_token_id=None, eos_token_id=None))
    windows = torch.from_numpy(load_dataset("pystdlib-bytes", seed=0).x).long()  # (N, 129) byte windows
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for step in range(steps):
        batch = windows[rng.integers(0, len(windows), 16)]
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"pretraining step {step + 1}/{steps}: loss {loss.item():.3f} nats/byte")
    folder = out / "tiny-gpt2"
    hf_logging.disable_progress_bar()
    model.save_pretrained(folder, safe_serialization=True)
    print(f"wrote {folder} ({sum(p.numel() for p in model.parameters()):,} parameters)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("tables", "images", "text", "gpt2"))
    parser.add_argument("--nodes", type=int, default=3, help="how many nodes' parts to write (default 3)")
    parser.add_argument("--out", type=pathlib.Path, default=OUT, help=f"where (default {OUT})")
    parser.add_argument("--steps", type=int, default=300, help="gpt2: pretraining steps (default 300)")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "gpt2":
        gpt2(args.out, args.steps)
    else:
        {"tables": tables, "images": images, "text": text}[args.what](args.nodes, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
