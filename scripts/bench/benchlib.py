"""What the benchmarks share: the repository root, the machine line, running a script, and writing their
section of docs/benchmarks.md. (Run as `python scripts/bench/bench_*.py` from the repository root: scripts/bench/ is then on sys.path.)"""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "docs" / "benchmarks.md"


# the Fashion-MNIST teachers of the benchmarks (scripts/train_dense.py flags after --dataset_name/--output_dir)
TRAINING = ["--weight_decay", "0.05", "--warmup_steps", "200", "--per_device_train_batch_size", "128",
            "--per_device_eval_batch_size", "256", "--eval_strategy", "epoch", "--save_strategy", "no",
            "--disable_tqdm", "true", "--report_to", "none"]
VIT_TEACHER = ["--image_size", "28", "--patch_size", "7", "--hidden_size", "192", "--num_hidden_layers", "6",
               "--num_attention_heads", "3", "--learning_rate", "1e-3", *TRAINING]
RESNET_TEACHER = ["--arch", "resnet", "--layer_type", "bottleneck", "--embedding_size", "32", "--hidden_sizes",
                  "64,128,256", "--depths", "2,2,2", "--image_size", "28", "--learning_rate", "2e-3", *TRAINING]


def prepare_teacher(data_dir: str, teacher_dir: str, teacher: list[str], epochs: int) -> list[str]:
    """Make what is missing: the Fashion-MNIST folder and the dense teacher. Returns the teacher's command."""
    py = sys.executable
    if not (ROOT / data_dir).exists():
        run([py, "scripts/prepare_data.py", "--dataset", "fashion-mnist", "--output_dir", data_dir])
    command = [py, "scripts/train_dense.py", "--dataset_name", data_dir, "--output_dir", teacher_dir,
               "--num_train_epochs", str(epochs), *teacher]
    if not (ROOT / teacher_dir / "config.json").exists():
        run(command)
    return command


@dataclass
class FashionMnistBench:
    """The flags shared by the benchmarks on the Fashion-MNIST ViT (bench_oneshot trains the teacher)."""

    data_dir: str = "data/fashion-mnist"
    teacher_dir: str = "outputs/fmnist-vit-tiny"
    methods: str = "magnitude,obs,cap,fastcap"
    sparsities: str = "0.5,0.75,0.9"
    no_write: bool = False  # do not touch docs/benchmarks.md


def parse_bench(arguments_class) -> tuple:
    """The benchmark's own flags (a dataclass) and the rest, forwarded to the script it runs: the pruning
    recipe is that script's PruningConfig (given after the benchmark's settings, so they override them)."""
    import __main__
    from cap_hf.cli.parser import HelpFormatter, ScriptParser

    parser = ScriptParser(arguments_class, prog=f"python scripts/bench/{Path(sys.argv[0]).name}",
                          description=getattr(__main__, "__doc__", None), formatter_class=HelpFormatter)
    args, forwarded = parser.parse_args_into_dataclasses(return_remaining_strings=True)
    return args, forwarded


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} (torch threads {torch.get_num_threads()})")


def command_line(script: str) -> str:
    """How this benchmark was run, with its thread count."""
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return " ".join([f"OMP_NUM_THREADS={threads}", "python", f"scripts/bench/{script}", *sys.argv[1:]])


def write_section(body: str, section: str, path: Path = BENCHMARKS) -> None:
    """Replace (or append) the part of docs/benchmarks.md that starts with `section`."""
    text = path.read_text() if path.exists() else \
        "# Benchmarks\n\nEvery number here comes from a script in scripts/; the command is given with it.\n"
    start = text.find(section)
    if start >= 0:
        end = text.find("\n## ", start + len(section))
        text = text[:start] + body.rstrip() + ("\n\n" + text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + body
    path.write_text(text.rstrip() + "\n")


def publish(lines: list[str], section: str, write: bool) -> None:
    """Print a benchmark's section (its lines) and, when `write`, put it into docs/benchmarks.md."""
    text = "\n".join(lines) + "\n"
    print(text)
    if write:
        write_section(text, section)


def load_reference():
    """tests/reference.py: the deliberately plain implementation the library is checked against."""
    spec = importlib.util.spec_from_file_location("cap_hf_reference", ROOT / "tests" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
