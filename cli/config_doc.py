"""The configuration reference in docs/configuration.md, generated from the pydantic models."""

from __future__ import annotations

from pydantic import BaseModel


def config_reference(models: list[type[BaseModel]]) -> str:
    parts = ["# Configuration reference", "",
             "Generated from the pydantic models by `osd config-doc`; every field is validated on load.", ""]
    for cls in models:
        parts += [f"## {cls.__name__}", "", (cls.__doc__ or "").strip().splitlines()[0], "",
                  "| field | default | meaning |", "|---|---|---|"]
        for name, field in cls.model_fields.items():
            default = field.default_factory() if field.default_factory is not None else field.default
            parts.append(f"| `{name}` | `{default!r}` | {field.description} |")
        parts.append("")
    return "\n".join(parts)


def all_config_models() -> list[type[BaseModel]]:
    from actors.config import OsdAppConfig
    from osd.config import EngineConfig, ModelConfig, SamplingParams, SuffixConfig, TreeConfig
    from osd.data.buffer import BufferConfig
    from osd.registry import RegistryConfig
    from osd.router import RouterConfig
    from osd.serving.dashboard import DashboardConfig
    from osd.serving.swap_watch import AutoRollbackConfig
    from trainers.config import DistillConfig, TrainerSettings

    return [OsdAppConfig, TrainerSettings, ModelConfig, EngineConfig, TreeConfig, SuffixConfig, SamplingParams,
            BufferConfig, RegistryConfig, DistillConfig, DashboardConfig, AutoRollbackConfig, RouterConfig]
