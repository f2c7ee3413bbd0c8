"""Write an offline data set as a `save_to_disk` folder that the other scripts take as --dataset_name.

  python scripts/prepare_data.py --dataset fashion-mnist --output_dir data/fashion-mnist
  python scripts/prepare_data.py --dataset digits --output_dir data/digits
"""

from pathlib import Path

from cap_hf.cli.parser import ArgumentParser, HelpFormatter, run
from cap_hf.io.data import FASHION_MNIST_DIR, digits_dataset, fashion_mnist_dataset


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python scripts/prepare_data.py", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", choices=["fashion-mnist", "digits"], required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--root", default=FASHION_MNIST_DIR, help="Folder of the Fashion-MNIST idx files.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"{out} already exists and is not empty; pass --overwrite to replace it.")
    try:
        dataset = fashion_mnist_dataset(args.root) if args.dataset == "fashion-mnist" else digits_dataset()
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    dataset.save_to_disk(str(out))
    print(f"wrote {args.dataset} to {out}: " + ", ".join(f"{k}={len(v)}" for k, v in dataset.items()))


if __name__ == "__main__":
    run(main)
