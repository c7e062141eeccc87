"""The model catalog: providers, models, aliases and tier defaults, from one YAML file.

Validation walks PyYAML's node tree (not the plain data) so every problem names the file and
line it is on; all problems are collected and reported together at start-up.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from services.kit.yamlfile import YamlFileError, YamlReader, compose, read_text

PROVIDER_KINDS = ("openai", "anthropic", "openai_compatible", "sim")
WIRE_FORMATS = ("openai", "anthropic")
MODEL_TYPES = ("chat", "embedding")
AUTO_ALIAS = "auto"
# Sampling parameters a model may or may not take (GenerationParams fields, by name).
SAMPLING_PARAMS = ("temperature", "top_p", "stop", "seed")
UNSUPPORTED_PARAM_POLICIES = ("drop", "reject")


class Strategy(enum.Enum):
    ORDERED = "ordered"
    WEIGHTED = "weighted"
    LOWEST_LATENCY = "lowest_latency"
    LOWEST_COST = "lowest_cost"


class CatalogError(ValueError):
    """The catalog file is invalid; each problem is `file:line: message`."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid router catalog:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class Outage:
    """A scripted outage of a sim provider, in seconds since it started."""

    start_s: float
    duration_s: float
    # down: connections are refused/closed; hang: no answer; error: HTTP 500 (or `status`);
    # break: streams stop after a few tokens; no_credit: the account is out of credit.
    mode: str
    status: int = 500


@dataclass(frozen=True)
class SimSpec:
    seed: int = 0
    latency_distribution: str = "lognormal"  # fixed | uniform | lognormal
    latency_median_ms: float = 200.0
    latency_p99_ms: float = 800.0
    tokens_per_second: float = 100.0
    error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    rpm: int = 0  # 0: unlimited
    tpm: int = 0
    outages: tuple[Outage, ...] = ()
    # Fixed port for the embedded server; 0 picks a free one.
    port: int = 0
    # Pieces of every answer (the label, the words and the final '.', each a streamed chunk and an
    # output token) before max_tokens or a stop sequence cuts it; 0: 14 to 37, seeded. A benchmark
    # sets it to stream a known number of chunks.
    answer_pieces: int = 0


@dataclass(frozen=True)
class Provider:
    name: str
    kind: str
    base_url: str
    api_key_env: str = ""
    region: str = ""
    # The wire format spoken to it: openai or anthropic (sim providers speak both).
    wire: str = "openai"
    # Azure OpenAI style: `api-key` header, /openai/deployments/<model>/… paths, api-version.
    azure_api_version: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    # OpenAI format: ask for usage in streams (stream_options); off for servers that reject it.
    stream_usage: bool = True
    sim: SimSpec | None = None
    # Resolved at start-up: the key's value, and whether the provider may be used.
    api_key: str = ""
    enabled: bool = True

    @property
    def simulated(self) -> bool:
        return self.kind == "sim"


@dataclass(frozen=True)
class Capabilities:
    """What a model takes, checked before every call (a provider 400 costs a round trip and says
    less). Unsupported sampling parameters are dropped or the request is refused, per model."""

    params: frozenset[str] = frozenset(SAMPLING_PARAMS)
    # drop: the parameter is not sent; reject: INVALID_ARGUMENT naming the field (when no other
    # candidate takes it).
    unsupported_params: str = "drop"
    tools: bool = True
    vision: bool = False
    # Extended thinking / reasoning before the answer (reported in ListModels).
    thinking: bool = False


@dataclass(frozen=True)
class Model:
    id: str
    provider: str
    provider_model: str
    context_window: int
    input_price_micros_per_mtok: int
    output_price_micros_per_mtok: int
    cached_input_price_micros_per_mtok: int
    type: str = "chat"
    dimensions: int = 0
    max_output_tokens: int = 0
    # Price of input tokens written to the prompt cache; None: the input price.
    cache_write_price_micros_per_mtok: int | None = None
    capabilities: Capabilities = field(default_factory=Capabilities)

    @property
    def cache_write_price(self) -> int:
        if self.cache_write_price_micros_per_mtok is None:
            return self.input_price_micros_per_mtok
        return self.cache_write_price_micros_per_mtok


@dataclass(frozen=True)
class Candidate:
    model: str
    weight: float = 1.0


@dataclass(frozen=True)
class Alias:
    name: str
    candidates: tuple[Candidate, ...]
    strategy: Strategy = Strategy.ORDERED


@dataclass(frozen=True)
class AutoRule:
    """How the `auto` alias tells a simple request from a complex one (see the README)."""

    simple: str = "budget"
    complex: str = "reasoning"
    long_input_tokens: int = 1500
    max_simple_messages: int = 12
    tools_are_complex: bool = True
    complex_keywords: tuple[str, ...] = ()


@dataclass(frozen=True)
class Catalog:
    providers: Mapping[str, Provider]
    models: Mapping[str, Model]
    aliases: Mapping[str, Alias]
    tier_defaults: Mapping[str, str]
    auto: AutoRule
    # When false, simulated models are used in an alias only if none of its real models is enabled.
    mix_simulated: bool = False
    source: str = ""

    def provider_of(self, model_id: str) -> Provider:
        return self.providers[self.models[model_id].provider]

    def enabled_models(self) -> list[Model]:
        return [m for m in self.models.values() if self.providers[m.provider].enabled]

    def with_provider(self, provider: Provider) -> Catalog:
        return replace(self, providers={**self.providers, provider.name: provider})


# --- loading -----------------------------------------------------------------------------------


KeyLookup = Callable[[str], "str | None"]


def load_catalog(path: str | Path, lookup: KeyLookup | None = None) -> Catalog:
    """Reads and validates the catalog; raises CatalogError naming every bad line.

    `lookup` reads the API-key variables the providers name (the config module passes its Env).
    """
    try:
        text = read_text(path, "catalog")
    except YamlFileError as exc:
        raise CatalogError(exc.problems) from exc
    return parse_catalog(text, str(path), lookup)


def parse_catalog(text: str, source: str = "<catalog>", lookup: KeyLookup | None = None) -> Catalog:
    reader = YamlReader(source)
    try:
        root = compose(text, source)
    except YamlFileError as exc:
        raise CatalogError(exc.problems) from exc
    if root is None:
        raise CatalogError([f"{source}:1: the catalog is empty"])
    top = reader.mapping(root, "catalog")
    if top is None:
        raise CatalogError(reader.problems)
    reader.unknown(
        top,
        {"version", "providers", "models", "aliases", "auto", "tier_defaults", "mix_simulated"},
        "catalog",
    )
    env: KeyLookup = lookup or (lambda _name: None)

    providers: dict[str, Provider] = {}
    if "providers" not in top:
        reader.bad(root, "catalog: providers is required")
    else:
        items: Mapping[str, tuple[yaml.Node, yaml.Node]] = (
            reader.mapping(top["providers"][1], "providers") or {}
        )
        for name, (_key, node) in items.items():
            provider = _provider(reader, name, node, env)
            if provider is not None:
                providers[name] = provider

    models: dict[str, Model] = {}
    model_lines: dict[str, yaml.Node] = {}
    if "models" not in top:
        reader.bad(root, "catalog: models is required")
    else:
        items = reader.mapping(top["models"][1], "models") or {}
        for name, (key, node) in items.items():
            model = _model(reader, name, node, providers)
            if model is not None:
                models[name] = model
                model_lines[name] = key

    aliases: dict[str, Alias] = {}
    if "aliases" in top:
        items = reader.mapping(top["aliases"][1], "aliases") or {}
        for name, (key, node) in items.items():
            if name == AUTO_ALIAS:
                reader.bad(key, "aliases: 'auto' is built in; configure it under the top-level auto: key")
                continue
            if name in models:
                reader.bad(key, f"aliases: {name!r} is also a model id")
            alias = _alias(reader, name, node, models)
            if alias is not None:
                aliases[name] = alias

    auto = AutoRule()
    if "auto" in top:
        auto = _auto(reader, top["auto"][1], aliases, models)
    elif AutoRule.simple not in aliases or AutoRule.complex not in aliases:
        reader.bad(root, "catalog: without an auto: section, aliases 'budget' and 'reasoning' must exist")

    tier_defaults: dict[str, str] = {}
    if "tier_defaults" in top:
        items = reader.mapping(top["tier_defaults"][1], "tier_defaults") or {}
        for tier, (_key, node) in items.items():
            target = str(reader.scalar(node, f"tier_defaults.{tier}") or "")
            if target != AUTO_ALIAS and target not in aliases and target not in models:
                reader.bad(node, f"tier_defaults.{tier}: {target!r} is neither an alias nor a model")
            tier_defaults[tier] = target
    if "default" not in tier_defaults:
        reader.bad(top.get("tier_defaults", (root, root))[1], "tier_defaults: a 'default' entry is required")

    mix = reader.boolean(top, "mix_simulated", "catalog", False)
    if reader.problems:
        raise CatalogError(reader.problems)
    return Catalog(providers, models, aliases, tier_defaults, auto, mix, source)


def _provider(reader: YamlReader, name: str, node: yaml.Node, env: KeyLookup) -> Provider | None:
    what = f"providers.{name}"
    items = reader.mapping(node, what)
    if items is None:
        return None
    reader.unknown(
        items,
        {
            "kind",
            "base_url",
            "api_key_env",
            "region",
            "wire",
            "azure_api_version",
            "headers",
            "stream_usage",
            "sim",
        },
        what,
    )
    if "kind" not in items:
        reader.bad(node, f"{what}: kind is required ({', '.join(PROVIDER_KINDS)})")
    kind = reader.string(items, "kind", what, "", choices=PROVIDER_KINDS)
    default_wire = "anthropic" if kind == "anthropic" else "openai"
    wire = reader.string(items, "wire", what, default_wire, WIRE_FORMATS)
    if kind in ("openai", "anthropic") and wire != kind:
        reader.bad(items["wire"][1], f"{what}.wire: a {kind} provider speaks {kind}")
    base_url = reader.string(items, "base_url", what, "" if kind == "sim" else None)
    if base_url and not base_url.startswith(("http://", "https://")):
        reader.bad(items["base_url"][1], f"{what}.base_url: must start with http:// or https://")
    api_key_env = reader.string(items, "api_key_env", what, "")
    headers: dict[str, str] = {}
    if "headers" in items:
        for header, (_k, value) in (reader.mapping(items["headers"][1], f"{what}.headers") or {}).items():
            headers[header] = str(reader.scalar(value, f"{what}.headers.{header}"))
    sim: SimSpec | None = None
    if kind == "sim":
        sim = _sim(reader, items["sim"][1], what) if "sim" in items else SimSpec()
    elif "sim" in items:
        reader.bad(items["sim"][0], f"{what}.sim: only sim providers take simulation parameters")
    api_key = (env(api_key_env) or "").strip() if api_key_env else ""
    # A real provider with a key variable is used only once the key is set; the sim needs none.
    enabled = kind == "sim" or not api_key_env or bool(api_key)
    return Provider(
        name=name,
        kind=kind,
        base_url=base_url.rstrip("/"),
        api_key_env=api_key_env,
        region=reader.string(items, "region", what, ""),
        wire=wire,
        azure_api_version=reader.string(items, "azure_api_version", what, ""),
        headers=headers,
        stream_usage=reader.boolean(items, "stream_usage", what, True),
        sim=sim,
        api_key=api_key,
        enabled=enabled,
    )


def _sim(reader: YamlReader, node: yaml.Node, parent: str) -> SimSpec:
    what = f"{parent}.sim"
    items = reader.mapping(node, what)
    if items is None:
        return SimSpec()
    reader.unknown(
        items,
        {
            "seed",
            "latency",
            "tokens_per_second",
            "error_rate",
            "rate_limit_rate",
            "rpm",
            "tpm",
            "outages",
            "port",
        },
        what,
    )
    spec = SimSpec(
        seed=reader.number(items, "seed", what, 0, integer=True),
        tokens_per_second=reader.number(items, "tokens_per_second", what, 100.0),
        error_rate=reader.number(items, "error_rate", what, 0.0, maximum=1.0),
        rate_limit_rate=reader.number(items, "rate_limit_rate", what, 0.0, maximum=1.0),
        rpm=reader.number(items, "rpm", what, 0, integer=True),
        tpm=reader.number(items, "tpm", what, 0, integer=True),
        port=reader.number(items, "port", what, 0, maximum=65535, integer=True),
    )
    if "latency" in items:
        lat: Mapping[str, tuple[yaml.Node, yaml.Node]] = (
            reader.mapping(items["latency"][1], f"{what}.latency") or {}
        )
        reader.unknown(lat, {"distribution", "median_ms", "p99_ms"}, f"{what}.latency")
        median = reader.number(lat, "median_ms", f"{what}.latency", 200.0)
        p99 = reader.number(lat, "p99_ms", f"{what}.latency", max(median, 800.0))
        if p99 < median:
            reader.bad(items["latency"][1], f"{what}.latency: p99_ms must be at least median_ms")
        spec = replace(
            spec,
            latency_distribution=reader.string(
                lat, "distribution", f"{what}.latency", "lognormal", ("fixed", "uniform", "lognormal")
            ),
            latency_median_ms=median,
            latency_p99_ms=p99,
        )
    outages: list[Outage] = []

    def one(item: yaml.Node, index: int) -> None:
        w = f"{what}.outages[{index}]"
        o = reader.mapping(item, w)
        if o is None:
            return
        reader.unknown(o, {"start_s", "duration_s", "mode", "status"}, w)
        outages.append(
            Outage(
                start_s=reader.number(o, "start_s", w, 0.0),
                duration_s=reader.number(o, "duration_s", w, 0.0),
                mode=reader.string(o, "mode", w, "error", ("down", "hang", "error", "break", "no_credit")),
                status=reader.number(o, "status", w, 500, minimum=400, maximum=599, integer=True),
            )
        )

    if "outages" in items:
        reader.each(items["outages"][1], f"{what}.outages", one)
    return replace(spec, outages=tuple(outages))


def _model(reader: YamlReader, name: str, node: yaml.Node, providers: Mapping[str, Provider]) -> Model | None:
    what = f"models.{name}"
    items = reader.mapping(node, what)
    if items is None:
        return None
    reader.unknown(
        items,
        {
            "provider",
            "provider_model",
            "context_window",
            "input_price_micros_per_mtok",
            "output_price_micros_per_mtok",
            "cached_input_price_micros_per_mtok",
            "cache_write_price_micros_per_mtok",
            "type",
            "dimensions",
            "max_output_tokens",
            "capabilities",
        },
        what,
    )
    provider = reader.string(items, "provider", what)
    if "provider" in items and provider not in providers:
        reader.bad(items["provider"][1], f"{what}.provider: unknown provider {provider!r}")
    input_price = reader.number(items, "input_price_micros_per_mtok", what, 0, integer=True)
    # Without explicit cache prices, Anthropic's price sheet rule applies to its models (reads
    # 0.1x, 5-minute writes 1.25x input); other providers' cached input costs the input price
    # until the catalog says otherwise.
    anthropic = provider in providers and providers[provider].wire == "anthropic"
    default_read = (input_price + 5) // 10 if anthropic else input_price
    default_write = (input_price * 5 + 2) // 4 if anthropic else input_price
    model_type = reader.string(items, "type", what, "chat", MODEL_TYPES)
    dimensions = reader.number(items, "dimensions", what, 0, integer=True)
    if model_type == "embedding" and dimensions <= 0:
        reader.bad(node, f"{what}: an embedding model needs dimensions > 0")
    return Model(
        id=name,
        provider=provider,
        provider_model=reader.string(items, "provider_model", what, name),
        context_window=reader.number(items, "context_window", what, 8192, minimum=1, integer=True),
        input_price_micros_per_mtok=input_price,
        output_price_micros_per_mtok=reader.number(
            items, "output_price_micros_per_mtok", what, 0, integer=True
        ),
        cached_input_price_micros_per_mtok=reader.number(
            items, "cached_input_price_micros_per_mtok", what, default_read, integer=True
        ),
        cache_write_price_micros_per_mtok=reader.number(
            items, "cache_write_price_micros_per_mtok", what, default_write, integer=True
        ),
        type=model_type,
        dimensions=dimensions,
        max_output_tokens=reader.number(items, "max_output_tokens", what, 0, integer=True),
        capabilities=_capabilities(reader, items["capabilities"][1], what)
        if "capabilities" in items
        else Capabilities(),
    )


def _capabilities(reader: YamlReader, node: yaml.Node, parent: str) -> Capabilities:
    what = f"{parent}.capabilities"
    items = reader.mapping(node, what)
    if items is None:
        return Capabilities()
    reader.unknown(items, {"params", "unsupported_params", "tools", "vision", "thinking"}, what)
    params: set[str] = set(SAMPLING_PARAMS)
    if "params" in items:
        params = set()

        def one(item: yaml.Node, index: int) -> None:
            name = str(reader.scalar(item, f"{what}.params[{index}]"))
            if name not in SAMPLING_PARAMS:
                reader.bad(
                    item, f"{what}.params[{index}]: {name!r} is not one of {', '.join(SAMPLING_PARAMS)}"
                )
            params.add(name)

        reader.each(items["params"][1], f"{what}.params", one)
    return Capabilities(
        params=frozenset(params),
        unsupported_params=reader.string(
            items, "unsupported_params", what, "drop", UNSUPPORTED_PARAM_POLICIES
        ),
        tools=reader.boolean(items, "tools", what, True),
        vision=reader.boolean(items, "vision", what, False),
        thinking=reader.boolean(items, "thinking", what, False),
    )


def _alias(reader: YamlReader, name: str, node: yaml.Node, models: Mapping[str, Model]) -> Alias | None:
    what = f"aliases.{name}"
    items = reader.mapping(node, what)
    if items is None:
        return None
    reader.unknown(items, {"strategy", "candidates"}, what)
    strategy = reader.string(items, "strategy", what, "ordered", tuple(s.value for s in Strategy))
    candidates: list[Candidate] = []

    def one(item: yaml.Node, index: int) -> None:
        w = f"{what}.candidates[{index}]"
        if isinstance(item, yaml.ScalarNode):
            model, weight = str(item.value), 1.0
        else:
            c = reader.mapping(item, w)
            if c is None:
                return
            reader.unknown(c, {"model", "weight"}, w)
            model = reader.string(c, "model", w)
            weight = reader.number(c, "weight", w, 1.0)
        if model not in models:
            reader.bad(item, f"{w}: unknown model {model!r}")
            return
        candidates.append(Candidate(model, float(weight)))

    if "candidates" not in items:
        reader.bad(node, f"{what}: candidates is required")
    else:
        reader.each(items["candidates"][1], f"{what}.candidates", one)
        if not items["candidates"][1].value:
            reader.bad(items["candidates"][1], f"{what}.candidates: needs at least one model")
    kinds = {models[c.model].type for c in candidates}
    if len(kinds) > 1:
        reader.bad(node, f"{what}: mixes chat and embedding models")
    try:
        parsed = Strategy(strategy)
    except ValueError:
        parsed = Strategy.ORDERED
    return Alias(name, tuple(candidates), parsed)


def _auto(
    reader: YamlReader, node: yaml.Node, aliases: Mapping[str, Alias], models: Mapping[str, Model]
) -> AutoRule:
    items = reader.mapping(node, "auto")
    if items is None:
        return AutoRule()
    reader.unknown(
        items,
        {
            "simple",
            "complex",
            "long_input_tokens",
            "max_simple_messages",
            "tools_are_complex",
            "complex_keywords",
        },
        "auto",
    )
    rule = AutoRule(
        simple=reader.string(items, "simple", "auto", "budget"),
        complex=reader.string(items, "complex", "auto", "reasoning"),
        long_input_tokens=reader.number(items, "long_input_tokens", "auto", 1500, integer=True),
        max_simple_messages=reader.number(items, "max_simple_messages", "auto", 12, integer=True),
        tools_are_complex=reader.boolean(items, "tools_are_complex", "auto", True),
    )
    for key in ("simple", "complex"):
        target = getattr(rule, key)
        if target not in aliases and target not in models:
            reader.bad(
                items[key][1] if key in items else node,
                f"auto.{key}: {target!r} is neither an alias nor a model",
            )
    keywords: list[str] = []
    if "complex_keywords" in items:
        reader.each(
            items["complex_keywords"][1],
            "auto.complex_keywords",
            lambda item, i: keywords.append(str(reader.scalar(item, f"auto.complex_keywords[{i}]")).lower()),
        )
    return replace(rule, complex_keywords=tuple(keywords))


def default_catalog_path() -> Path:
    """config/router_catalog.yaml in the working directory, else the one in the source tree."""
    local = Path("config/router_catalog.yaml")
    if local.exists():
        return local
    return Path(__file__).resolve().parents[2] / "config" / "router_catalog.yaml"
