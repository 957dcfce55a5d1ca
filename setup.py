from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def requirements(name: str) -> list[str]:
    lines = (HERE / "requirements" / f"{name}.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


setup(
    name="navit_dense",
    version="0.1.0",
    description="Dense prediction (detection, segmentation) with native-resolution NaViT backbones",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["navit_dense", "navit_dense.*"]),
    install_requires=requirements("core"),
    extras_require={
        "dev": requirements("dev"),
        "mmseg": requirements("mmseg") if (HERE / "requirements" / "mmseg.txt").exists() else [],
        # detectron2 is not on PyPI: install it per its own guide, then this extra adds its deps.
        "detectron2": ["fvcore>=0.1.5", "iopath>=0.1.9", "cloudpickle", "tabulate", "yacs", "termcolor", "hydra-core", "black"],
    },
)
