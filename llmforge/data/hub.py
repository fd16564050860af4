"""Hugging Face datasets as sources: `data.<name>.hf` (a Hub dataset, through the `datasets`
library and its cache) and `data.<name>.path` naming a folder `save_to_disk` wrote.

Either way a source ends as Arrow files on this disk, which the rest of the data path reads like any
other files (columnar.py): `datasets` keeps a loaded split as Arrow shards in its cache, and a saved
dataset is Arrow shards beside a state.json listing them. So the token cache keys a Hub dataset by
its files' contents, as it keys a jsonl file: a new revision is tokenized again, an unchanged one
never is. `datasets` is imported only for `hf` sources (an optional extra, `llmforge[hf]`); a
saved folder needs only pyarrow.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from ..errors import DataError

SPLIT = "train"  # the split a dataset source reads unless data.<name>.split names another


def hub_files(name: str, hf: str, subset: str | None, split: str | None, revision: str | None) -> list[Path]:
    """The Arrow files of a Hub dataset's split, loaded (or found in the cache) by `datasets`."""
    return list(_load(name, hf, subset, split or SPLIT, revision, os.environ.get("HF_DATASETS_CACHE")))


@functools.lru_cache(maxsize=None)  # a plan lists a source's files several times; load it once
def _load(name: str, hf: str, subset: str | None, split: str, revision: str | None,
          cache_dir: str | None) -> tuple[Path, ...]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.{name}.hf: reading Hugging Face datasets needs the datasets library",
                        hint="pip install 'llmforge[datasets]'") from None
    datasets.logging.set_verbosity_error()  # "Found the latest cached dataset..." is ours to say
    datasets.disable_progress_bars()  # llmforge shows its own progress
    fetch = f"hf download --repo-type dataset {hf}" + (f" --revision {revision}" if revision else "")
    offline = datasets.config.HF_HUB_OFFLINE
    try:
        ds = datasets.load_dataset(hf, subset, split=split, revision=revision, cache_dir=cache_dir)
    except ConnectionError:  # offline, or the Hub unreachable, and no copy in the cache
        why = "is not in the datasets cache and HF_HUB_OFFLINE is set" if offline else \
            "could not be fetched (the Hub is unreachable) and is not in the datasets cache"
        raise DataError(f"data.{name}.hf: {hf!r} {why}",
                        hint=f"fetch it on a machine with internet (`{fetch}`, or run once online) and copy "
                             "the Hugging Face cache here") from None
    except OSError as e:  # its cache entry is damaged (a file it lists is gone)
        raise DataError(f"data.{name}.hf: {hf!r} cannot be read from the datasets cache ({_first_line(e)})",
                        hint=f"delete its folder in the datasets cache and fetch it again (`{fetch}`)") from None
    except datasets.exceptions.DatasetNotFoundError as e:
        raise DataError(f"data.{name}.hf: {hf!r} is not a dataset on the Hub or it is gated ({_first_line(e)})",
                        hint="check the name (org/dataset); for a gated one accept its terms and `hf auth login`") from None
    except ValueError as e:  # an unknown split or subset: datasets lists the ones there are
        message = _first_line(e)
        key = "subset" if "config" in message.lower() else "split"
        raise DataError(f"data.{name}.{key}: {message}", hint=f"set data.{name}.{key} to one the dataset has") from None
    files = tuple(Path(f["filename"]) for f in ds.cache_files)
    if not files:  # a dataset held in memory only (a loading script's own choice): nothing to read back
        raise DataError(f"data.{name}.hf: {hf!r} loads into memory, not into Arrow files",
                        hint="save it once with Dataset.save_to_disk and point data.<name>.path at that folder")
    return files


def saved_files(name: str, folder: Path, split: str | None) -> list[Path] | None:
    """The Arrow shards of a folder `save_to_disk` wrote, in order (None: not such a folder). A
    DatasetDict's folder holds one such folder per split (data.<name>.split, default train)."""
    if (folder / "dataset_dict.json").is_file():
        splits = _splits(folder)
        chosen = split or SPLIT
        if chosen not in splits:
            raise DataError(f"data.{name}.split: {folder} has no split {chosen!r} (splits: {', '.join(splits)})",
                            hint=f"set data.{name}.split to one of them")
        folder = folder / chosen
    elif split not in (None, SPLIT) and (folder / "state.json").is_file():
        raise DataError(f"data.{name}.split: {folder} is a single saved split, not a dataset with splits",
                        hint=f"leave data.{name}.split out")
    state = folder / "state.json"
    if not state.is_file():
        return None
    try:
        listed = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{state}: not a state.json that save_to_disk wrote ({e})",
                        hint="save the dataset again with Dataset.save_to_disk") from None
    files = [folder / f for f in listed]
    if missing := [f.name for f in files if not f.is_file()]:
        raise DataError(f"{folder}: state.json lists {missing[0]}, which is not there",
                        hint="copy the whole folder save_to_disk wrote") from None
    return files


def _splits(folder: Path) -> list[str]:
    try:
        return list(json.loads((folder / "dataset_dict.json").read_text())["splits"])
    except (ValueError, KeyError, TypeError):
        return sorted(p.name for p in folder.iterdir() if (p / "state.json").is_file())


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
