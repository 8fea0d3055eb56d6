"""The reference in docs/ stays true to the code, and nothing in the repository points outside it.

Every setting, CLI command and option, job error code and gateway route must be documented; the docs may
name nothing that does not exist, except what is listed here as landing (remove it from the list when it
lands). Links and paths must resolve inside the repository.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main

from stylequeue.cli import app
from stylequeue.config.settings import CONFIG_ENV, ENV_PREFIX, Settings
from stylequeue.config.styles import StyleSpec
from stylequeue.errors import ErrorCode
from stylequeue.models.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Documented from the contract but not built yet: each entry must go once the code has it.
PENDING_SETTINGS: set[str] = set()
PENDING_ROUTES: set[tuple[str, str]] = set()
# Names `stylequeue serve` writes into client.env for the user's own HTTP callers; stylequeue never reads them.
CLIENT_ENV_ONLY = {"STYLEQUEUE_API_URL", "STYLEQUEUE_API_TOKEN"}
# Options every command shares, described once at the top of docs/cli.md.
SHARED_OPTIONS = {"--config", "--debug"}


def read(name: str) -> str:
    return (DOCS / name).read_text()


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


# --- settings ---------------------------------------------------------------------------------------------


def test_every_setting_is_in_the_configuration_reference() -> None:
    text = read("configuration.md")
    names = [ENV_PREFIX + name.upper() for name in Settings.model_fields]
    missing = [name for name in names if f"`{name}`" not in text]
    assert not missing, f"docs/configuration.md does not describe {missing}"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_docs_name_only_real_settings(path: Path) -> None:
    real = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | {CONFIG_ENV}
    named = set(re.findall(r"\bSTYLEQUEUE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    unknown = sorted(named - real - PENDING_SETTINGS - CLIENT_ENV_ONLY)
    assert not unknown, f"{path.name} names settings that do not exist: {unknown}"


def test_pending_settings_are_still_pending() -> None:
    landed = sorted(PENDING_SETTINGS & {ENV_PREFIX + name.upper() for name in Settings.model_fields})
    assert not landed, f"{landed} exist now: drop them from PENDING_SETTINGS and their '(landing)' marks in docs/"


# --- the command line -------------------------------------------------------------------------------------


def commands(group: Any = None, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    """(`name` or `group name`, click command) for every command of the Typer app."""
    group = group or typer.main.get_command(app)
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):
            yield from commands(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


def cli_sections() -> dict[str, str]:
    """`### name` heading of docs/cli.md -> its text up to the next heading."""
    parts = re.split(r"^(#{2,3} .+)$", read("cli.md"), flags=re.MULTILINE)
    return {head.removeprefix("### ").strip(): body for head, body in zip(parts[1::2], parts[2::2], strict=True)
            if head.startswith("### ")}


def test_every_command_and_option_is_in_the_cli_reference() -> None:
    sections = cli_sections()
    preamble = read("cli.md").split("\n## ", 1)[0]
    problems = []
    for name, command in commands():
        if name not in sections:
            problems.append(f"no '### {name}' section")
            continue
        for param in command.params:
            for flag in (f for f in param.opts if f.startswith("-")):
                where = preamble if flag in SHARED_OPTIONS else sections[name]
                if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", where):
                    problems.append(f"{name}: {flag}")
    assert not problems, f"docs/cli.md misses: {problems}"


def test_the_cli_reference_documents_no_command_that_does_not_exist() -> None:
    names = {name for name, _ in commands()}
    extra = sorted(set(cli_sections()) - names)
    assert not extra, f"docs/cli.md has sections for commands that do not exist: {extra}"


# --- jobs, styles, recipes ---------------------------------------------------------------------------------


def test_every_error_code_is_in_the_jobs_reference() -> None:
    text = read("jobs.md")
    assert not [code.value for code in ErrorCode if f"`{code.value}`" not in text]


def first_column(name: str) -> set[str]:
    """The backticked names in the first column of every table row of a docs page."""
    return set(re.findall(r"^\| `([a-z0-9_]+)` \|", read(name), flags=re.MULTILINE))


def test_every_recipe_field_and_no_other_is_in_the_recipes_reference() -> None:
    assert first_column("recipes.md") == set(Recipe.__dataclass_fields__)


def test_every_registry_key_and_no_other_is_in_the_styles_reference() -> None:
    assert first_column("styles.md") == set(StyleSpec.__dataclass_fields__) - {"name", "extra"}


# --- the HTTP gateway --------------------------------------------------------------------------------------


def gateway_routes() -> set[tuple[str, str]]:
    pytest.importorskip("fastapi")
    from fastapi.routing import APIRoute

    from stylequeue.producer.client import Client
    from stylequeue.producer.gateway import make_app

    gateway = make_app(Client(redis_url="redis://127.0.0.1:1/0"), ["a-token"])  # builds the routes, connects nowhere

    def walk(routes: list) -> list[APIRoute]:  # routers included into the app keep their own route lists
        found: list[APIRoute] = []
        for route in routes:
            if isinstance(route, APIRoute):
                found.append(route)
            elif hasattr(route, "original_router"):
                found += walk(route.original_router.routes)
        return found

    return {(method, re.sub(r"\{[^}]*\}", "{}", route.path)) for route in walk(gateway.routes)
            for method in route.methods}


def documented_routes() -> set[tuple[str, str]]:
    found = re.findall(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`\s?]*)", read("http.md"))
    return {(method, re.sub(r"\{[^}]*\}", "{}", path)) for method, path in found}


def test_every_gateway_route_is_in_the_http_reference() -> None:
    missing = sorted(gateway_routes() - documented_routes())
    assert not missing, f"docs/http.md does not document {missing}"


def test_the_http_reference_lists_only_built_or_landing_routes() -> None:
    built = gateway_routes()
    assert not sorted(documented_routes() - built - PENDING_ROUTES)
    landed = sorted(PENDING_ROUTES & built)
    assert not landed, f"{landed} are built now: drop them from PENDING_ROUTES and their '(landing)' marks"


# --- nothing points outside the repository -------------------------------------------------------------------


def tracked_text_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = []
    for name in listed.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue
        head = path.read_bytes()[:8192]
        if b"\0" not in head:
            files.append(path)
    return files


OUTSIDE = re.compile(r"\.\./shared|/work/|PERF\.md|SPEC\.md|\bSPEC(?: section|'s| \d| \"| [a-z])")


def test_no_file_refers_to_files_outside_the_repository() -> None:
    offenders = []
    for path in tracked_text_files():
        if path == Path(__file__).resolve():
            continue  # this file names the patterns
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not offenders, "references to files outside the repository:\n" + "\n".join(offenders)


def test_docs_pages_named_anywhere_exist() -> None:
    missing = []
    for path in tracked_text_files():
        for named in set(re.findall(r"\bdocs/[A-Za-z0-9_-]+\.(?:md|png)\b", path.read_text(errors="replace"))):
            if not (ROOT / named).is_file():
                missing.append(f"{path.relative_to(ROOT)} names {named}")
    assert not missing, missing


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", without_code(path.read_text()), flags=re.MULTILINE):
        base, n = slug(heading), 0
        while (candidate := base if n == 0 else f"{base}-{n}") in found:
            n += 1
        found.add(candidate)
    return found


def without_code(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("path", [*markdown_files(), ROOT / "deploy" / "README.md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_links_resolve_inside_the_repository(path: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", without_code(path.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.is_relative_to(ROOT) or not linked.exists():
            broken.append(f"{target}: no such file in the repository")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{path.relative_to(ROOT)}: {broken}"
