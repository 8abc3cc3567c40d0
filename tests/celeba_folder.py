"""A CelebA-format folder of made-up faces: real file formats and names, synthetic pixels.

The pixels show three of the attributes plainly (Male tints the image red rather than blue,
Smiling draws a bright bar where a mouth would be, Eyeglasses a dark bar across the eyes), so
a classifier can learn them in a few steps. Also a command, for trying the CelebA studies
without the real data:

    python -m tests.celeba_folder data/celeba-fake --train 1600 --test 400
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

ATTRIBUTE_NAMES = [
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
]
WIDTH, HEIGHT = 178, 218  # the aligned CelebA images' size


def face(attributes: torch.Tensor, generator: torch.Generator) -> Image.Image:
    """One 178x218 RGB image whose look follows Male, Smiling and Eyeglasses."""
    male, smiling, glasses = (
        bool(attributes[ATTRIBUTE_NAMES.index(name)]) for name in ("Male", "Smiling", "Eyeglasses")
    )
    pixels = torch.rand(3, HEIGHT, WIDTH, generator=generator) * 60 + 70
    pixels[0 if male else 2] += 90
    if smiling:
        pixels[:, 150:170, 50:128] = 250
    if glasses:
        pixels[:, 85:100, 30:148] = 10
    array = pixels.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array, "RGB")


def write_celeba_folder(
    root: Path, train: int = 24, valid: int = 4, test: int = 12, seed: int = 0
) -> torch.Tensor:
    """Write <root>/celeba/{img_align_celeba/*.jpg, list_attr_celeba.txt,
    list_eval_partition.txt} with `train`, `valid` and `test` images in partitions 0, 1, 2 (in
    that order, as in CelebA); return the attributes as 0/1 int64 [N, 40]."""
    folder = root / "celeba"
    images = folder / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    count = train + valid + test
    attributes = (torch.rand(count, len(ATTRIBUTE_NAMES), generator=generator) < 0.4).long()
    attr_lines = [str(count), " ".join(ATTRIBUTE_NAMES)]
    partition_lines = []
    for index in range(count):
        name = f"{index + 1:06d}.jpg"
        face(attributes[index], generator).save(images / name, quality=90)
        values = " ".join(f"{1 if bit else -1:2d}" for bit in attributes[index].tolist())
        attr_lines.append(f"{name} {values}")
        partition = 0 if index < train else 1 if index < train + valid else 2
        partition_lines.append(f"{name} {partition}")
    (folder / "list_attr_celeba.txt").write_text("\n".join(attr_lines) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(partition_lines) + "\n")
    return attributes


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a CelebA-format folder of fake faces.")
    parser.add_argument("root", type=Path, help="data root: writes ROOT/celeba/...")
    parser.add_argument("--train", type=int, default=1600)
    parser.add_argument("--test", type=int, default=400)
    args = parser.parse_args()
    write_celeba_folder(args.root, train=args.train, valid=0, test=args.test)
    print(f"wrote {args.train + args.test} images to {args.root / 'celeba'}")


if __name__ == "__main__":
    main()
