"""python -m model_cards FOLDER [--base_model ID] [--dataset ID] ...: (re)write a checkpoint's card."""

import argparse

from model_cards.card import write_model_card


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model_cards", description=__doc__)
    parser.add_argument("folder")
    parser.add_argument("--repo_id", default=None, help="Name shown in the card and its loading snippet.")
    parser.add_argument("--base_model", default=None)
    parser.add_argument("--dataset", default=None, help="Hub id of the evaluation dataset.")
    parser.add_argument("--dataset_name", default=None, help="Display name, e.g. ImageNet-1k.")
    parser.add_argument("--eval_split", default="validation")
    parser.add_argument("--license", default=None, help="Default: the base model's license when it can be read.")
    args = parser.parse_args(argv)
    try:
        path = write_model_card(args.folder, repo_id=args.repo_id, base_model=args.base_model, dataset=args.dataset,
                                dataset_name=args.dataset_name, eval_split=args.eval_split, license=args.license)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
