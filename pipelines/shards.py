"""CLI: ``python -m pipelines.shards write|index|info``; see ``--help``.

    python -m pipelines.shards write --source digits --out data/digits --shard-size 200
    python -m pipelines.shards write --source cifar10:cifar-10-python.tar.gz --out s3://bucket/cifar10
    python -m pipelines.shards index --split train='s3://b/imagenet/train-{000000..001281}.tar' \
        --split val='s3://b/imagenet/val-{000000..000049}.tar' --out s3://b/imagenet-index
    python -m pipelines.shards info data/digits
"""

from __future__ import annotations

import argparse
import sys

from pipelines import storage
from pipelines.format import read_manifest
from pipelines.sources import parse_source
from pipelines.writer import index_shards, write_shards

# -- CLI ------------------------------------------------------------------------------------------


def _bytes(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M, 1G, 1000000)") from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.shards",
        description="Write image datasets as tar shards + manifest.json to a folder or S3, or describe them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser(
        "write",
        help="encode a source into shards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Encode a source into shards under --out.\n\n"
            "sources:\n"
            "  digits                   scikit-learn digits, 32x32 RGB PNG, fixed 70/15/15 split\n"
            "  cifar10:PATH             cifar-10-python.tar.gz or its folder (45k/5k/10k)\n"
            "  cifar100:PATH            cifar-100-python.tar.gz or its folder (45k/5k/10k)\n"
            "  imagefolder:PATH         PATH/{train,val[,test]}/<class>/<image>, JPEG kept as is\n"
            "  synthetic:k=v,...        classes=10,size=64|64-128,train=1000,val=200,test=0,format=jpg|png,seed=0\n\n"
            "examples:\n"
            "  python -m pipelines.shards write --source digits --out data/digits --shard-size 200\n"
            "  python -m pipelines.shards write --source imagefolder:/imagenet --out s3://bucket/imagenet --max-bytes 256M\n\n"
            "S3 uses boto3: AWS_ENDPOINT_URL and the usual AWS credential chain apply."
        ),
    )
    write.add_argument("--source", required=True, help="what to read (see above)")
    write.add_argument("--out", required=True, help="a local folder or s3://bucket/prefix")
    write.add_argument("--shard-size", type=int, default=1000, help="samples per shard at most (default 1000)")
    write.add_argument("--max-bytes", type=_bytes, default=256 << 20, help="bytes per shard at most, e.g. 256M (default 256M)")
    write.add_argument("--splits", default=None, help="comma-separated splits to write (default: all of the source's)")
    write.add_argument("--seed", type=int, default=0, help="seed of the one-off train shuffle before sharding (default 0)")
    write.add_argument("--upload-workers", type=int, default=4, help="shards written/uploaded at once (default 4)")
    write.add_argument("--stats-limit", type=int, default=50_000, help="train images used for mean/std (default 50000)")
    write.add_argument("--quiet", action="store_true", help="no progress bar")
    index = sub.add_parser(
        "index",
        help="write the manifest for existing WebDataset shards (e.g. made by webdataset.ShardWriter)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Scan existing WebDataset shards (local or S3) in parallel and write manifest.json to --out, so\n"
            "make_loader and training read them where they are, unchanged. Samples need an image\n"
            "(jpg, jpeg, png or webp) and a label: cls (an integer as text), or a field of json.\n\n"
            "examples:\n"
            "  python -m pipelines.shards index --split train='/data/wds/train-{000000..000009}.tar' \\\n"
            "      --split val='/data/wds/val-{000000..000001}.tar' --out /data/wds\n"
            "  python -m pipelines.shards index --split train='s3://b/imagenet/train-{000000..001281}.tar' \\\n"
            "      --split val='s3://b/imagenet/val-{000000..000049}.tar' --label-key json:label --out s3://b/imagenet-index"
        ),
    )
    index.add_argument("--split", action="append", required=True, metavar="NAME=PATTERN", help="a split and its brace pattern of shards (repeat per split)")
    index.add_argument("--out", required=True, help="folder or s3://bucket/prefix for manifest.json (shards elsewhere are listed by absolute URL)")
    index.add_argument("--label-key", default="cls", help="where the label is: cls (default) or json:FIELD")
    index.add_argument("--classes", default=None, metavar="FILE", help="class names, one per line in label order (default: 0..max label)")
    index.add_argument("--workers", type=int, default=8, help="shards scanned at once (default 8)")
    index.add_argument("--stats-limit", type=int, default=50_000, help="train images used for mean/std (default 50000)")
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    info = sub.add_parser("info", help="print a dataset's manifest summary")
    info.add_argument("url", help="a local folder or s3://bucket/prefix")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "write":
            write_shards(
                parse_source(args.source),
                args.out,
                shard_size=args.shard_size,
                max_bytes=args.max_bytes,
                seed=args.seed,
                splits=args.splits.split(",") if args.splits else None,
                upload_workers=args.upload_workers,
                stats_limit=args.stats_limit,
                progress=not args.quiet,
            )
        elif args.command == "index":
            splits = {}
            for item in args.split:
                name, sep, pattern = item.partition("=")
                if not sep or not name or not pattern:
                    raise ValueError(f"--split {item!r}: expected NAME=PATTERN, e.g. train=/data/train-{{000000..000009}}.tar")
                splits[name] = pattern
            classes = None
            if args.classes:
                with open(args.classes) as f:
                    classes = [line.strip() for line in f if line.strip()]
            index_shards(
                splits,
                args.out,
                label_key=args.label_key,
                classes=classes,
                workers=args.workers,
                stats_limit=args.stats_limit,
                progress=not args.quiet,
            )
        else:
            m = read_manifest(args.url)
            print(f"{args.url}: source={m['source']} classes={m['num_classes']} image_size={m['image_size']}")
            print(f"  mean={m['mean']} std={m['std']}")
            for split, s in m["splits"].items():
                print(f"  {split}: {s['num_samples']} samples in {len(s['shards'])} shard(s)")
    except (ValueError, FileNotFoundError, storage.StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
