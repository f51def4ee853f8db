"""latesteps: diffusion late steps for removing artifacts from generated images (fork-style of CompVis latent-diffusion)."""

from setuptools import find_packages, setup

setup(
    name="latesteps",
    version="0.1.0",
    description="Latent diffusion trained on timestep windows; SDEdit-style refinement of generated images.",
    packages=find_packages(include=["ldm", "ldm.*"]),
    python_requires=">=3.10",
    # Ranges, not pins: a GPU user keeps their own CUDA build of torch. CI's exact pins are in requirements.txt.
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "pytorch-lightning>=2.0,<3",
        "omegaconf>=2.1",
        "einops>=0.6",
        "numpy>=1.23",
        "pillow>=9.1",
        "taming-transformers-rom1504>=0.0.6",
        "safetensors>=0.3",
        "tqdm>=4.60",
        "lpips>=0.1.4",
        "torchmetrics>=1.0",
        "scikit-image>=0.21",
        "matplotlib>=3.6",
        "webdataset>=1.0.2,<2",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2", "hypothesis>=6", "ruff>=0.4"],
        # diffusers interop (ldm.convert.diffusers reads folders without it; the tests compare against it)
        "diffusers": ["diffusers>=0.42,<1"],
        # the local web app (scripts/app.py): an ASGI server and framework; the page itself ships in ldm/app/static
        "app": ["starlette>=0.40,<2", "uvicorn>=0.30,<1"],
    },
    package_data={"ldm.app": ["static/*"]},
)
