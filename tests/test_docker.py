"""docker/ and deploy/k8s/: the images, the compose file and the Kubernetes work-pool templates.

No Docker engine or cluster runs here, so these are static checks against the project itself:
the Dockerfiles install the project from pyproject.toml (the pins `make install` uses) and any
pin they add agrees with it; every COPY source exists and survives .dockerignore; the compose
file's builds, volumes, ports and URLs fit together and put `runs/` where the flow writes it;
the templates pass Prefect's own validation and render to the resources they promise.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = ROOT / "deploy" / "k8s"
IMAGES = ("cpu", "cuda", "tpu")
TEMPLATES = {"gpu-node": ("nvidia.com/gpu", "gpu_count", "cuda"),
             "tpu-slice": ("google.com/tpu", "tpu_chips", "tpu")}
LIBTPU_LINKS = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
KNOWN_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                      "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK",
                      "SHELL"}
# The project itself, with or without extras: `.`, `.[hf]`, or `.${EXTRAS:+[$EXTRAS]}`.
PROJECT_SPEC = re.compile(r"^\.(\[[\w,-]*\]|\$\{EXTRAS:\+\[\$EXTRAS\]\})?$")
PIP_OPTIONS_WITH_VALUE = {"-f", "--find-links", "-i", "--index-url", "--extra-index-url", "-c",
                          "--constraint", "-r", "--requirement"}


# ---------------------------------------------------------------- helpers

def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    instructions, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # comments (also inside a continuation) and blank lines
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        instructions.append((keyword, " ".join(args.split())))
        pending = ""
    assert not pending, "the last instruction ends in a line continuation"
    return instructions


def dockerfile(image: str) -> list[tuple[str, str]]:
    return parse_dockerfile((DOCKER / f"Dockerfile.{image}").read_text())


def args_of(instructions, keyword: str) -> list[str]:
    return [args for kw, args in instructions if kw == keyword]


def exec_or_shell(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def copy_sources(args: str) -> list[str]:
    parts = [p for p in exec_or_shell(args) if not p.startswith("--")]
    assert len(parts) >= 2, f"COPY needs a source and a destination: {args}"
    return parts[:-1]


def env_of(instructions) -> dict[str, str]:
    env = {}
    for args in args_of(instructions, "ENV"):
        for pair in shlex.split(args):
            key, sep, value = pair.partition("=")
            assert sep, f"ENV {args!r}: use the KEY=VALUE form"
            env[key] = value
    return env


def pip_installs(instructions) -> list[dict]:
    """Every `pip install` in RUN lines: its requirement arguments and option values."""
    installs = []
    for args in args_of(instructions, "RUN"):
        for command in re.split(r"&&|;", args):
            words = shlex.split(command)
            if "pip" not in words or "install" not in words:
                continue
            words = words[words.index("install") + 1:]
            specs, options, i = [], {}, 0
            while i < len(words):
                word = words[i]
                if word in PIP_OPTIONS_WITH_VALUE:
                    options.setdefault(word, []).append(words[i + 1])
                    i += 2
                    continue
                if not word.startswith("-"):
                    specs.append(word)
                i += 1
            installs.append({"specs": specs, "options": options})
    return installs


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pyproject_pins() -> dict[str, str]:
    """Dependency name -> exact version, for the `==` pins of pyproject (core and extras)."""
    project = pyproject()["project"]
    deps = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        deps += extra
    pins = {}
    for dep in deps:
        req = Requirement(dep)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            pins[req.name.lower()] = exact[0]
    return pins


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines
            if line.strip() and not line.strip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops `path` (or a folder above it) from the build context."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        assert not pattern.startswith("!"), "exceptions are not modelled by this check"
        if pattern.startswith("**/"):
            tail = pattern[3:]
            if any(fnmatch.fnmatch(part, tail) for part in parts):
                return True
        elif any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            return True
    return False


def flow_runs_dir_default() -> str:
    """The `runs_dir` default of the `staged_growth` flow, read from its source."""
    tree = ast.parse((ROOT / "flows" / "staged_growth.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "staged_growth":
            names = [a.arg for a in node.args.args]
            defaults = dict(zip(names[len(names) - len(node.args.defaults):], node.args.defaults))
            return ast.literal_eval(defaults["runs_dir"])
    raise AssertionError("flows/staged_growth.py has no staged_growth flow")


def runs_path(image: str = "cpu") -> str:
    """Where the flow writes runs/ in the image: its working directory + the flow's default."""
    workdir = args_of(dockerfile(image), "WORKDIR")[-1]
    return f"{workdir.rstrip('/')}/{flow_runs_dir_default()}"


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def template(name: str) -> dict:
    return json.loads((K8S / f"{name}.json").read_text())


PLACEHOLDER = re.compile(r"{{\s*([\w.\-\[\]$]+)\s*}}")


def placeholders(value) -> set[str]:
    return set(PLACEHOLDER.findall(json.dumps(value)))


def render(tmpl: dict, values: dict | None = None) -> dict:
    """job_configuration with the variables' defaults and `values`, as a Prefect worker does."""
    from prefect.utilities.templating import apply_values

    props = tmpl["variables"]["properties"]
    merged = {k: v["default"] for k, v in props.items() if v.get("default") is not None}
    return apply_values(tmpl["job_configuration"], {**merged, **(values or {})})


# ---------------------------------------------------------------- Dockerfiles

def test_dockerfile_parser_joins_continuations_and_drops_comments():
    text = "# syntax=docker/dockerfile:1\nFROM a\n# note\nRUN x \\\n    # inside\n    && y\nCMD [\"z\"]\n"
    assert parse_dockerfile(text) == [("FROM", "a"), ("RUN", "x && y"), ("CMD", '["z"]')]
    with pytest.raises(AssertionError):
        parse_dockerfile("RUN x \\\n")


@pytest.mark.parametrize("image", IMAGES)
def test_dockerfile_instructions_and_base(image):
    instructions = dockerfile(image)
    keywords = [kw for kw, _ in instructions]
    assert set(keywords) <= KNOWN_INSTRUCTIONS, set(keywords) - KNOWN_INSTRUCTIONS
    assert [kw for kw in keywords if kw != "ARG"][0] == "FROM"
    bases = args_of(instructions, "FROM")
    assert bases == ["python:3.11-slim"], bases
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    assert "3.11" in requires  # the base image's Python satisfies the project


@pytest.mark.parametrize("image", IMAGES)
def test_dockerfile_copies_exist_and_survive_dockerignore(image):
    patterns = dockerignore_patterns()
    sources = [s for args in args_of(dockerfile(image), "COPY") for s in copy_sources(args)]
    assert sources
    for source in sources:
        assert list(ROOT.glob(source.rstrip("/"))), f"COPY {source}: not in the build context"
        assert not ignored(source.rstrip("/"), patterns), f"COPY {source}: .dockerignore drops it"


@pytest.mark.parametrize("image", IMAGES)
def test_dockerfile_copies_what_the_install_needs_before_installing(image):
    """pyproject.toml, its readme and every package it lists are in place before pip runs."""
    instructions = dockerfile(image)
    first_install = next(i for i, (kw, args) in enumerate(instructions)
                         if kw == "RUN" and "pip install" in args)
    copied = {s.rstrip("/") for kw, args in instructions[:first_install] if kw == "COPY"
              for s in copy_sources(args)}
    project = pyproject()
    needed = {"pyproject.toml", project["project"]["readme"]}
    includes = project["tool"]["setuptools"]["packages"]["find"]["include"]
    needed |= {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()
               and any(fnmatch.fnmatch(p.name, inc) for inc in includes)}
    assert {"deepfusion_core", "pipeline", "flows", "deepfusion_cli"} <= needed
    assert needed <= copied, needed - copied


@pytest.mark.parametrize("image", IMAGES)
def test_dockerfile_installs_the_project_with_pyprojects_pins(image):
    installs = pip_installs(dockerfile(image))
    assert len(installs) == 1, "one pip install: the project and any extra pin resolve together"
    specs = installs[0]["specs"]
    project_specs = [s for s in specs if PROJECT_SPEC.match(s)]
    assert len(project_specs) == 1, f"installs the project from its pyproject.toml: {specs}"
    extras = re.findall(r"[\w-]+", project_specs[0][1:].replace("EXTRAS", ""))
    assert set(extras) <= set(pyproject()["project"]["optional-dependencies"]), extras
    pins = pyproject_pins()
    for spec in specs:
        if spec in project_specs:
            continue
        req = Requirement(spec)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        assert exact and len(req.specifier) == 1, f"{spec}: pin it with =="
        assert req.name.lower() in pins, f"{spec}: only re-pins of pyproject's dependencies"
        assert exact[0] == pins[req.name.lower()], f"{spec} disagrees with pyproject's " \
                                                   f"{req.name}=={pins[req.name.lower()]}"


def test_ci_installs_the_same_project_spec():
    """`.ci/run` -> `make test` -> `make install`: `pip install -e '.[test,hf]'` of pyproject."""
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^install:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    words = shlex.split(recipe.replace("$(PIP)", "pip"))
    assert words[:2] == ["pip", "install"] and "-e" in words
    assert PROJECT_SPEC.match(words[-1]), words


@pytest.mark.parametrize("image, extra", [("cuda", "cuda12"), ("tpu", "tpu")])
def test_accelerator_images_add_jax_extra_at_pyprojects_jax(image, extra):
    install = pip_installs(dockerfile(image))[0]
    jax = [Requirement(s) for s in install["specs"]
           if not PROJECT_SPEC.match(s) and Requirement(s).name == "jax"]
    assert len(jax) == 1 and jax[0].extras == {extra}, install["specs"]
    assert str(jax[0].specifier) == f"=={pyproject_pins()['jax']}"
    if image == "tpu":
        assert install["options"].get("-f") == [LIBTPU_LINKS]


def test_cpu_image_adds_no_pins():
    specs = pip_installs(dockerfile("cpu"))[0]["specs"]
    assert all(PROJECT_SPEC.match(s) for s in specs), specs


@pytest.mark.parametrize("image", IMAGES)
def test_dockerfile_runtime_settings(image):
    instructions = dockerfile(image)
    env = env_of(instructions)
    assert env.get("PREFECT_SERVER_ANALYTICS_ENABLED") == "false"
    users = args_of(instructions, "USER")
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    last_user = max(i for i, (kw, _) in enumerate(instructions) if kw == "USER")
    assert all(kw != "RUN" for kw, _ in instructions[last_user:]), "RUN after USER: root needed?"
    assert args_of(instructions, "WORKDIR") == ["/app"]
    volumes = [v for args in args_of(instructions, "VOLUME") for v in exec_or_shell(args)]
    assert runs_path(image) in volumes, (runs_path(image), volumes)
    # The worker entry point: the pool from the environment; no ENTRYPOINT, so Kubernetes and
    # Docker pools can replace the command with the flow-run command.
    assert not args_of(instructions, "ENTRYPOINT")
    cmd = " ".join(exec_or_shell(args_of(instructions, "CMD")[-1]))
    assert "prefect worker start" in cmd and "--pool \"$PREFECT_WORK_POOL\"" in cmd, cmd
    assert env.get("PREFECT_WORK_POOL")


def test_dockerignore_keeps_local_state_out():
    patterns = dockerignore_patterns()
    for path in (".venv/bin/python", "runs/x/nodes", ".git/HEAD", "dist/deepfusion-0.1.0.whl",
                 ".prefect/profiles.toml", "deepfusion.egg-info/PKG-INFO"):
        assert ignored(path, patterns), path
    for path in ("pyproject.toml", "flows/staged_growth.py", "deepfusion_core/model.py"):
        assert not ignored(path, patterns), path


# ---------------------------------------------------------------- compose

def test_compose_services_build_from_existing_dockerfiles():
    services = compose()["services"]
    assert {"postgres", "prefect-server", "worker"} <= set(services)
    built = {}
    for name, service in services.items():
        if "build" not in service:
            assert "image" in service, name
            continue
        context = (DOCKER / service["build"]["context"]).resolve()
        dockerfile_path = context / service["build"]["dockerfile"]
        assert context == ROOT, f"{name}: build context must be the repository root"
        assert dockerfile_path.is_file(), f"{name}: {dockerfile_path} missing"
        built[name] = dockerfile_path.name
    assert built["prefect-server"] == built["worker"] == "Dockerfile.cpu"


def test_compose_volumes_are_declared_and_runs_is_where_the_flow_writes():
    doc = compose()
    declared = set(doc.get("volumes") or {})
    used = {}
    for name, service in doc["services"].items():
        for mount in service.get("volumes", []):
            source, _, target = mount.partition(":")
            target = target.split(":")[0]
            if not source.startswith((".", "/")):  # a named volume, not a bind mount
                assert source in declared, f"{name}: volume {source!r} is not declared"
                used.setdefault(source, set()).add((name, target))
    assert {("worker", runs_path("cpu"))} <= used["runs"]
    assert all(target == runs_path("cpu") for _, target in used["runs"])
    assert declared <= set(used), f"declared but unused: {declared - set(used)}"


def _compose_default(value: str) -> str:
    """What compose substitutes for `${VAR:-default}` when VAR is unset ("" for `${VAR:?}`)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}|\$\{\w+:\?[^}]*\}", lambda m: m.group(1) or "", value)


def test_compose_ports_and_urls_fit_together():
    services = compose()["services"]
    server = services["prefect-server"]
    published = {}
    for port in server["ports"]:
        address, host, container = _compose_default(str(port)).rsplit(":", 2)
        assert address == "127.0.0.1", f"published on {address!r} by default, not loopback"
        host, container = int(host), int(container)
        assert 0 < host < 65536 and 0 < container < 65536
        published[container] = host
    command = server["command"]
    port = int(command[command.index("--port") + 1]) if "--port" in command else 4200
    assert command[:3] == ["prefect", "server", "start"] and "0.0.0.0" in command
    assert published.get(port) == 4200
    api = services["worker"]["environment"]["PREFECT_API_URL"]
    assert api == f"http://prefect-server:{port}/api"
    assert server["environment"]["PREFECT_UI_API_URL"] == f"http://localhost:{published[port]}/api"
    for name, service in services.items():
        if name.startswith("worker"):
            assert service["environment"]["PREFECT_API_URL"] == api
            assert service["command"][:3] == ["prefect", "worker", "start"]
            assert service["depends_on"]["prefect-server"]["condition"] == "service_healthy"


def test_compose_database_is_postgres_through_asyncpg():
    import importlib.metadata

    services = compose()["services"]
    env = services["prefect-server"]["environment"]
    assert env["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    postgres = services[env["PREFECT_SERVER_DATABASE_HOST"]]
    assert postgres["image"].startswith("postgres:16")
    assert postgres["environment"]["POSTGRES_USER"] == env["PREFECT_SERVER_DATABASE_USER"]
    assert postgres["environment"]["POSTGRES_DB"] == env["PREFECT_SERVER_DATABASE_NAME"]
    # One secret, from docker/.env, on both sides.
    assert postgres["environment"]["POSTGRES_PASSWORD"] == env["PREFECT_SERVER_DATABASE_PASSWORD"]
    assert env["PREFECT_SERVER_DATABASE_PORT"] == "5432"
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("postgres", "prefect-server"):
        assert services[name]["healthcheck"]["test"], name
    # The server image gets asyncpg from prefect itself (no extra pin in Dockerfile.cpu).
    requires = importlib.metadata.requires("prefect") or []
    assert any(Requirement(r).name == "asyncpg" and not Requirement(r).marker for r in requires)


SECRET_NAME = re.compile(r"PASSWORD|AUTH_STRING")


def test_compose_is_closed_by_default_and_reads_its_secrets_from_docker_env():
    services = compose()["services"]
    server_env = services["prefect-server"]["environment"]
    assert re.fullmatch(r"\$\{PREFECT_AUTH_STRING:\?[^}]+\}", server_env["PREFECT_SERVER_API_AUTH_STRING"])
    for name, service in services.items():
        if name.startswith("worker"):  # every client of the API sends the auth string
            assert service["environment"]["PREFECT_API_AUTH_STRING"] == \
                server_env["PREFECT_SERVER_API_AUTH_STRING"], name
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):  # only a reference to docker/.env, never a value
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{name}.{key}: {value!r}"
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "docker/.env" in ignored and "docker/.env" in (ROOT / ".dockerignore").read_text().split()
    example = (DOCKER / ".env.example").read_text()
    for key in ("POSTGRES_PASSWORD", "PREFECT_AUTH_STRING"):
        value = re.search(rf"^{key}=(.*)$", example, re.M).group(1)
        assert "<" in value and ">" in value, f"{key} in .env.example is not a placeholder"


@pytest.mark.parametrize("name", TEMPLATES)
def test_k8s_template_takes_the_auth_string_from_a_secret(name):
    tmpl = template(name)
    container = render(tmpl)["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    default = tmpl["variables"]["properties"]["auth_secret"]["default"]
    assert container["envFrom"] == [{"secretRef": {"name": default}}]
    assert "PREFECT_API_AUTH_STRING" in tmpl["variables"]["properties"]["auth_secret"]["description"]


def test_no_tracked_file_holds_a_password_or_auth_string():
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    # KEY: value, KEY=value, "KEY": "value", or a URL's user:password@host.
    assignment = re.compile(r"""\b\w*(?:PASSWORD|AUTH_STRING)\w*["']?\s*[:=]\s*["']?([^\s"',}]+)""")
    url_password = re.compile(r"://[\w.-]+:([^@\s/]+)@")
    offenders = []
    for rel in tracked:
        path = ROOT / rel
        if rel.startswith("tests/") or not path.is_file() or path.stat().st_size > 1_000_000:
            continue
        text = path.read_text(errors="replace")
        for match in [*assignment.finditer(text), *url_password.finditer(text)]:
            value = match.group(1)
            if not value.startswith(("${", "<", "{{")):  # a reference or a placeholder
                offenders.append(f"{rel}: {match.group(0)}")
    assert offenders == []


def test_compose_gpu_worker_is_optional_and_reserves_gpus():
    service = compose()["services"]["worker-gpu"]
    assert service["profiles"] == ["gpu"]
    assert service["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


# ---------------------------------------------------------------- Kubernetes templates

@pytest.mark.parametrize("name", TEMPLATES)
def test_k8s_template_placeholders_match_variables(name):
    tmpl = template(name)
    assert set(tmpl) == {"job_configuration", "variables"}
    declared = set(tmpl["variables"]["properties"])
    used = placeholders(tmpl["job_configuration"])
    assert used <= declared, f"undeclared: {used - declared}"
    assert declared <= used, f"declared but never used (no effect): {declared - used}"


@pytest.mark.parametrize("name", TEMPLATES)
def test_k8s_template_passes_prefects_validation_and_keeps_its_defaults(name):
    """What `prefect work-pool create --base-job-template` sends the server, and the default
    Kubernetes template's keys and variables (the worker relies on them) all kept."""
    import prefect
    from prefect.server.schemas.actions import WorkPoolCreate

    tmpl = template(name)
    WorkPoolCreate(name=name, type="kubernetes", base_job_template=tmpl)
    metadata = Path(prefect.__file__).parent / "server/api/collections_data/views/" \
                                               "aggregate-worker-metadata.json"
    default = json.loads(metadata.read_text())["prefect-kubernetes"]["kubernetes"][
        "default_base_job_configuration"]
    assert set(default["job_configuration"]) <= set(tmpl["job_configuration"])
    assert set(default["variables"]["properties"]) <= set(tmpl["variables"]["properties"])
    bad = json.loads(json.dumps(tmpl).replace("{{ namespace }}", "{{ no_such_variable }}"))
    with pytest.raises(ValueError, match="no_such_variable"):
        WorkPoolCreate(name=name, type="kubernetes", base_job_template=bad)


@pytest.mark.parametrize("name", TEMPLATES)
def test_k8s_template_renders_the_accelerator_request_and_the_runs_volume(name):
    resource, variable, image = TEMPLATES[name]
    tmpl = template(name)
    default = tmpl["variables"]["properties"][variable]["default"]
    assert tmpl["variables"]["properties"][variable]["type"] == "integer" and default >= 1
    for values, expected in (({}, default), ({variable: 8}, 8)):
        pod = render(tmpl, values)["job_manifest"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["resources"]["limits"][resource] == expected
        assert container["resources"]["requests"][resource] == expected
    raw = tmpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert raw["args"] == "{{ command }}"  # the worker fills in the flow-run command
    assert container["image"] == f"deepfusion:{image}"
    assert (DOCKER / f"Dockerfile.{image}").is_file()
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["runs"] == runs_path(image)
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    assert claims["runs"] == tmpl["variables"]["properties"]["runs_claim"]["default"]
    description = tmpl["variables"]["description"]
    assert "deepfusion run-node" in description and "launcher" in description


def test_tpu_template_selects_a_gke_tpu_slice():
    tmpl = template("tpu-slice")
    pod = render(tmpl, {"tpu_accelerator": "tpu-v4-podslice", "tpu_topology": "2x2x1"})[
        "job_manifest"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v4-podslice",
                                   "cloud.google.com/gke-tpu-topology": "2x2x1"}
    defaults = render(tmpl)["job_manifest"]["spec"]["template"]["spec"]["nodeSelector"]
    assert all(defaults.values()), defaults
    assert {"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_gpu_template_node_selector_is_optional():
    tmpl = template("gpu-node")
    pod = render(tmpl)["job_manifest"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {}
    chosen = {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    pod = render(tmpl, {"node_selector": chosen})["job_manifest"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == chosen


# ---------------------------------------------------------------- README

def test_readme_names_existing_docker_and_kubernetes_files():
    text = (ROOT / "README.md").read_text()
    assert "## Running across machines" in text
    paths = set(re.findall(r"(?:docker|deploy/k8s)/[\w.\-]+", text))
    assert {"docker/compose.yaml", "deploy/k8s/gpu-node.json", "deploy/k8s/tpu-slice.json"} <= paths
    local_secrets = {"docker/.env"}  # made by the user from docker/.env.example, git-ignored
    for path in paths - local_secrets:
        assert (ROOT / path).exists(), path
