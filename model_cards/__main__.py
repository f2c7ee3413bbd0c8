"""python -m model_cards FOLDER [--base_model ID] [--dataset ID] ...: (re)write a checkpoint's card."""

from cap_hf.cli.parser import ArgumentParser, run
from model_cards.card import write_model_card


def main(argv=None) -> None:
    parser = ArgumentParser(prog="python -m model_cards", description=__doc__)
    parser.add_argument("folder")
    parser.add_argument("--repo_id", default=None, help="The Hub id it is (or will be) published as: the card's title "
                        "and its loading snippet (default: the folder's name, and its path in the snippet).")
    parser.add_argument("--base_model", default=None, help="Default: the one the run recorded. Another is refused "
                        "unless --override_record.")
    parser.add_argument("--dataset", default=None, help="Hub id of the evaluation dataset (default: the recorded one; "
                        "another is refused unless --override_record).")
    parser.add_argument("--override_record", action="store_true", help="Use --base_model / --dataset although the run "
                        "recorded others (a warning, and the card says so).")
    parser.add_argument("--dataset_name", default=None, help="Display name, e.g. ImageNet-1k.")
    parser.add_argument("--eval_split", default="validation")
    parser.add_argument("--license", default=None, help="Default: the base model's license when it can be read.")
    args = parser.parse_args(argv)
    try:
        path = write_model_card(args.folder, repo_id=args.repo_id, base_model=args.base_model, dataset=args.dataset,
                                dataset_name=args.dataset_name, eval_split=args.eval_split, license=args.license,
                                override_record=args.override_record)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {path}")


if __name__ == "__main__":
    run(main)
