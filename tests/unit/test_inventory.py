"""Inventory loading: every validation rule, good and bad, with `file:line key.path` and a hint."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparkctl.errors import EXIT_BAD_INPUT, InventoryError
from sparkctl.inventory import example_inventory_text, load_inventory, parse_inventory
from sparkctl.session import door

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "inventories" / "example-pair.yaml"
PACKAGED = REPO / "sparkctl" / "data" / "example-pair.yaml"


def only(found: list) -> object:
    """The single problem of a list (fails, showing them all, if there are more or none)."""
    assert len(found) == 1, [p.render() for p in found]
    return found[0]


# --- the bundled example ------------------------------------------------------------------------------


def test_bundled_example_is_identical_to_the_packaged_copy() -> None:
    assert EXAMPLE.read_bytes() == PACKAGED.read_bytes(), "inventories/ and sparkctl/data/ copies diverged"
    assert example_inventory_text() == EXAMPLE.read_text()


def test_bundled_example_loads_as_a_pair() -> None:
    inv = load_inventory(EXAMPLE)
    assert inv == parse_inventory(example_inventory_text())
    assert [h.name for h in inv.hosts] == ["spark-a", "spark-b"]
    assert inv.head.name == "spark-a"
    assert inv.network.mtu == 9000
    for h in inv.hosts:
        assert len(h.fabric) == 2
        nets = {t.address.network for t in h.fabric}
        assert len(nets) == 2, "each twin of a host is on its own subnet"
    # link j joins fabric[j] of both hosts: same subnet
    for j in range(2):
        assert inv.hosts[0].fabric[j].address.network == inv.hosts[1].fabric[j].address.network
    assert inv.runtime.venv and inv.runtime.image is None
    assert [w.name for w in inv.workloads] == ["chat"]


# --- unknown keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "path", "suggestion"),
    [
        ("    address: 10.0.0.11", "    adress: 10.0.0.11", "hosts[0].adress", "address"),
        ("  mtu: 9000", "  mut: 9000", "network.mut", "mtu"),
        ("  mtu: 9000", "  mtus: 9000", "network.mtus", "mtu"),
        (
            "        rdma_device: roceP2p1s0f1\n  - name: spark-b",
            "        rdma_devcie: roceP2p1s0f1\n  - name: spark-b",
            "hosts[0].fabric[1].rdma_devcie",
            "rdma_device",
        ),
        ("workloads:", "workload:", "workload", "workloads"),
        (
            "    gpu_memory_utilization: 0.85",
            "    gpu_memory_utilisation: 0.85",
            "workloads[0].gpu_memory_utilisation",
            "gpu_memory_utilization",
        ),
    ],
)
def test_unknown_key_is_located_and_gets_did_you_mean(problems, example, old, new, path, suggestion) -> None:
    text = example.edit(old, new)
    key = path.rsplit(".", 1)[-1].split("]")[-1]
    p = only(problems(text))
    assert p.where == f"inv.yaml:{text.line_of(key + ':')} {path}"
    assert key in p.message
    assert f"did you mean '{suggestion}'" in p.hint


def test_misspelt_required_key_is_one_problem_not_two(problems, example) -> None:
    # `adress` for the required `address`: one problem (unknown key), not also "address is required"
    found = problems(example.edit("    address: 10.0.0.12", "    adress: 10.0.0.12"))
    assert [p.where.split(" ")[1] for p in found] == ["hosts[1].adress"]


def test_unknown_key_without_close_match_lists_known_keys(problems, example) -> None:
    text = example.edit("  topology: direct", "  topology: direct\n  zzqx: 1")
    p = only(problems(text))
    assert p.where == f"inv.yaml:{text.line_of('zzqx')} network.zzqx"
    assert "mtu" in p.hint and "topology" in p.hint


# --- hosts ---------------------------------------------------------------------------------------------


def test_duplicate_host_names(problems, example) -> None:
    text = example.edit("- name: spark-b", "- name: spark-a")
    p = only(problems(text))
    assert p.where == f"inv.yaml:{text.splitlines().index('  - name: spark-a', 20) + 1} hosts[1].name"
    assert "spark-a" in p.message and "duplicate" in p.message
    assert p.hint


def test_duplicate_management_addresses(problems, example) -> None:
    text = example.edit("address: 10.0.0.12", "address: 10.0.0.11")
    p = only(problems(text))
    second = [n for n, line in enumerate(text.splitlines(), 1) if "address: 10.0.0.11" in line][1]
    assert p.where == f"inv.yaml:{second} hosts[1].address"
    assert "spark-a" in p.message
    assert p.hint


@pytest.mark.parametrize("bad", ["eth0;rm -rf /", "-x", "a b", "$(id)", "a\tb", "eth0`id`", "x|y", "name'"])
def test_host_names_with_shell_characters_are_rejected(problems, example, bad: str) -> None:
    text = example.edit("- name: spark-b", f"- name: {_yaml_str(bad)}")
    p = only(problems(text))
    assert p.where == f"inv.yaml:{text.line_of('- name: ' + _yaml_str(bad))} hosts[1].name"
    assert repr(bad) in p.message
    assert p.hint


def test_a_cluster_name_of_63_characters_is_the_longest(problems, example) -> None:
    name = "c" * 63
    assert parse_inventory(example.edit("cluster: spark-pair", f"cluster: {name}")).cluster == name
    p = only(problems(example.edit("cluster: spark-pair", f"cluster: {name}x")))
    assert p.where == "inv.yaml:3 cluster"
    assert "64 characters long" in p.message and "at most 63" in p.message
    assert name not in p.message, "the message shows the start of the name, not all of it"


@pytest.mark.parametrize("bad", ["eth0;rm -rf /", "-x", "a b", "$(id)", "enp1s0f1np1&&x", "averyveryverylongname0"])
def test_interface_names_with_shell_characters_are_rejected(problems, example, bad: str) -> None:
    text = example.edit(
        "- interface: enP2p1s0f1np1\n        address: 192.168.101.11/24",
        f"- interface: {_yaml_str(bad)}\n        address: 192.168.101.11/24",
    )
    p = only(problems(text))
    assert p.where == f"inv.yaml:{text.line_of('- interface: ' + _yaml_str(bad))} hosts[1].fabric[1].interface"
    assert repr(bad) in p.message
    assert "enp1s0f1np1" in p.hint, "the hint shows what an interface name looks like"


@pytest.mark.parametrize("good", ["enP2p1s0f1np1", "enp2s0f0np0", "eth0.100", "br_fab-1"])
def test_plain_interface_names_are_accepted(example, good: str) -> None:
    inv = parse_inventory(
        example.edit(
            "- interface: enP2p1s0f1np1\n        address: 192.168.101.11/24",
            f"- interface: {good}\n        address: 192.168.101.11/24",
        )
    )
    assert inv.hosts[1].fabric[1].interface == good


# --- fabric addresses ----------------------------------------------------------------------------------


def test_twin_address_reused_on_another_host(problems, example) -> None:
    text = example.edit("address: 192.168.100.11/24", "address: 192.168.100.10/24")
    p = only(problems(text))
    line = [n for n, x in enumerate(text.splitlines(), 1) if "192.168.100.10/24" in x][1]
    assert p.where == f"inv.yaml:{line} hosts[1].fabric[0].address"
    assert "spark-a" in p.message and "enp1s0f1np1" in p.message
    assert "own address" in p.hint


def test_two_twins_of_one_host_on_one_subnet(problems, example) -> None:
    text = example.edit("address: 192.168.101.10/24", "address: 192.168.100.12/24")
    found = problems(text)
    at = f"inv.yaml:{text.line_of('192.168.100.12/24')} hosts[0].fabric[1].address"
    shared = [p for p in found if p.where == at and "shares subnet 192.168.100.0/24" in p.message]
    assert len(shared) == 1, [p.render() for p in found]
    assert "own subnet" in shared[0].hint


def test_addresses_of_one_link_must_share_a_subnet(problems, example) -> None:
    text = example.edit("address: 192.168.101.11/24", "address: 192.168.102.11/24")
    p = only(problems(text))
    assert p.where == f"inv.yaml:{text.line_of('192.168.102.11/24')} hosts[1].fabric[1].address"
    assert "192.168.101.0/24" in p.message
    assert "192.168.101.0/24" in p.hint


def test_network_address_of_the_subnet_is_not_a_host_address(problems, example) -> None:
    text = example.edit("address: 192.168.100.11/24", "address: 192.168.100.0/24")
    p = only(problems(text))
    assert p.where.endswith("hosts[1].fabric[0].address")
    assert "network or broadcast" in p.message


def test_fabric_subnet_must_not_contain_the_management_address(problems, example) -> None:
    text = example.edit("address: 10.0.0.12", "address: 192.168.101.99")
    found = problems(text)
    assert any(p.where.endswith("hosts[1].fabric[1].address") and "management" in p.message for p in found)


@pytest.mark.parametrize(("mtu", "ok"), [(1279, False), (1280, True), (9000, True), (9216, True), (9217, False)])
def test_mtu_bounds(problems, example, mtu: int, ok: bool) -> None:
    text = example.edit("  mtu: 9000", f"  mtu: {mtu}")
    if ok:
        assert parse_inventory(text).network.mtu == mtu
        return
    p = only(problems(text))
    assert p.where == f"inv.yaml:{text.line_of(f'mtu: {mtu}')} network.mtu"
    assert str(mtu) in p.message
    assert ("1280" if mtu < 1280 else "9216") in p.hint


# --- workloads -----------------------------------------------------------------------------------------


def test_tensor_parallel_larger_than_the_gpus(problems, example) -> None:
    text = example.edit("tensor_parallel_size: 2", "tensor_parallel_size: 3")
    p = only(problems(text))
    assert p.where == f"inv.yaml:{text.line_of('tensor_parallel_size')} workloads[0].tensor_parallel_size"
    assert "2" in p.hint


def test_tensor_parallel_counts_gpus_of_every_host(example) -> None:
    text = example.edit("tensor_parallel_size: 2", "tensor_parallel_size: 3\n    executor: ray").edit(
        "  - name: spark-b\n", "  - name: spark-b\n    gpus: 2\n"
    )
    assert parse_inventory(text).workloads[0].tensor_parallel_size == 3


@pytest.mark.parametrize(
    ("value", "ok"),
    [("0.91", False), ("0.90", True), ("0.9", True), ("0.5", True), ("0", False), ("1.2", False)],
)
def test_gpu_memory_utilization_bounds(problems, example, value: str, ok: bool) -> None:
    text = example.edit("gpu_memory_utilization: 0.85", f"gpu_memory_utilization: {value}")
    if ok:
        assert parse_inventory(text).workloads[0].gpu_memory_utilization == float(value)
        return
    p = only(problems(text))
    assert p.where == f"inv.yaml:{text.line_of('gpu_memory_utilization')} workloads[0].gpu_memory_utilization"
    assert p.hint


def test_gpu_memory_utilization_defaults_to_085(example) -> None:
    inv = parse_inventory(example.edit("    gpu_memory_utilization: 0.85\n", ""))
    assert inv.workloads[0].gpu_memory_utilization == 0.85


@pytest.mark.parametrize("bad", ["Qwen/Qwen3'; rm -rf ~", 'Qwen/"x"', "Qwen/x y", "-m", "$(id)/m"])
def test_model_names_with_quotes_or_shell_characters_are_rejected(problems, example, bad: str) -> None:
    text = example.edit("model: Qwen/Qwen3-30B-A3B-Instruct-2507", f"model: {_yaml_str(bad)}")
    p = only(problems(text))
    assert p.where == f"inv.yaml:{text.line_of('model:')} workloads[0].model"
    assert repr(bad) in p.message


@pytest.mark.parametrize("good", ["Qwen/Qwen3-30B-A3B-Instruct-2507", "/models/llama-3.1", "~/m/x@main", "org/m:fp8"])
def test_model_ids_and_paths_are_accepted(example, good: str) -> None:
    inv = parse_inventory(example.edit("model: Qwen/Qwen3-30B-A3B-Instruct-2507", f"model: {_yaml_str(good)}"))
    assert inv.workloads[0].model == good


def test_extra_args_with_newline_rejected(problems, example) -> None:
    text = example.edit(
        'extra_args: ["--max-model-len", "32768"]', 'extra_args: ["--max-model-len", "32768\\nrm -rf /"]'
    )
    p = only(problems(text))
    assert p.where == f"inv.yaml:{text.line_of('extra_args')} workloads[0].extra_args[1]"
    assert "single line" in p.message


def test_env_keys_must_be_variable_names(problems, example) -> None:
    text = example.edit("    port: 8000", "    port: 8000\n    env: {'A B': x}")
    p = only(problems(text))
    # the key itself is blamed, on its own line, with a fix
    assert p.where == f"inv.yaml:{text.line_of('A B')} workloads[0].env.A B"
    assert "'A B'" in p.message
    assert "letters, digits and '_'" in p.hint


# --- runtime and ray -----------------------------------------------------------------------------------


def test_runtime_with_both_venv_and_image_rejected(problems, example) -> None:
    text = example.edit(
        "  venv: /opt/sparkctl-runtime",
        "  venv: /opt/sparkctl-runtime\n  image: nvcr.io/nvidia/vllm:25.11-py3",
    )
    p = only(problems(text))
    assert p.where == f"inv.yaml:{text.line_of('runtime:')} runtime"
    assert "venv" in p.message and "image" in p.message
    assert "exactly one" in p.hint


def test_runtime_with_neither_rejected_but_absent_section_defaults_to_a_venv(problems, example) -> None:
    text = example.edit("  venv: /opt/sparkctl-runtime", "  shm_size_gb: 8")
    assert only(problems(text)).where.endswith(" runtime")
    inv = parse_inventory(example.edit("runtime:\n  venv: /opt/sparkctl-runtime\n", ""))
    assert inv.runtime.venv == "/opt/sparkctl-runtime" and inv.runtime.image is None


def test_image_runtime_accepted(example) -> None:
    inv = parse_inventory(example.edit("  venv: /opt/sparkctl-runtime", "  image: nvcr.io/nvidia/vllm:25.11-py3"))
    assert inv.runtime.image == "nvcr.io/nvidia/vllm:25.11-py3" and inv.runtime.venv is None


def test_runtime_nccl_system_is_for_a_venv(problems, example) -> None:
    venv = "  venv: /opt/sparkctl-runtime"
    inv = parse_inventory(example.edit(venv, venv + "\n  nccl: system"))
    assert inv.runtime.nccl == "system"
    text = example.edit("  venv: /opt/sparkctl-runtime", "  image: nvcr.io/nvidia/vllm:26.05-py3\n  nccl: system")
    p = only(problems(text))
    assert p.where.endswith(" runtime") and "not inside the container" in p.message


def test_ray_head_naming_an_unknown_host(problems, example) -> None:
    text = example.edit("head: spark-a", "head: spark-c")
    p = only(problems(text))
    assert p.where == f"inv.yaml:{text.line_of('head: spark-c')} ray.head"
    assert "spark-c" in p.message
    assert "spark-a" in p.hint and "spark-b" in p.hint


def test_ray_head_defaults_to_the_first_host(example) -> None:
    inv = parse_inventory(example.edit("  head: spark-a\n", ""))
    assert inv.ray.head is None and inv.head.name == "spark-a"


def test_workload_port_on_a_ray_port_rejected(problems, example) -> None:
    text = example.edit("    port: 8000", "    port: 6379")
    p = only(problems(text))
    assert p.where.endswith("workloads[0].port") and "Ray" in p.message


# --- everything at once, and bad files -----------------------------------------------------------------


def test_every_schema_problem_is_reported_at_once(problems, example) -> None:
    text = (
        example.edit("  mtu: 9000", "  mtu: 9217")
        .edit("- name: spark-b", "- name: '-x'")
        .edit("gpu_memory_utilization: 0.85", "gpu_memory_utilization: 0.91")
    )
    found = problems(text)
    assert [p.where for p in found] == [
        f"inv.yaml:{text.line_of('mtu: 9217')} network.mtu",
        f"inv.yaml:{text.line_of('-x')} hosts[1].name",
        f"inv.yaml:{text.line_of('gpu_memory_utilization')} workloads[0].gpu_memory_utilization",
    ]


def test_every_cross_field_problem_is_reported_at_once(problems, example) -> None:
    text = (
        example.edit("address: 10.0.0.12", "address: 10.0.0.11")
        .edit("head: spark-a", "head: nowhere")
        .edit("tensor_parallel_size: 2", "tensor_parallel_size: 4")
    )
    paths = sorted(p.where.split(" ", 1)[1] for p in problems(text))
    assert paths == ["hosts[1].address", "ray.head", "workloads[0].tensor_parallel_size"]


def test_the_error_renders_every_problem_with_its_hint(example) -> None:
    text = example.edit("head: spark-a", "head: nowhere").edit("address: 10.0.0.12", "address: 10.0.0.11")
    with pytest.raises(InventoryError) as info:
        parse_inventory(text, "inv.yaml")
    rendered = str(info.value).splitlines()
    assert sum(line.startswith("error: inv.yaml:") for line in rendered) == 2
    assert sum(line.startswith("hint: ") for line in rendered) == 2


def test_not_yaml_gives_file_and_line(problems, example) -> None:
    text = example.edit("  port: 6379", "  port: [6379")
    p = only(problems(text))
    file, line = p.where.split(" ")[0].split(":")
    assert file == "inv.yaml"
    # the parser notices at the bracket's line or just after it
    assert text.line_of("[6379") <= int(line) <= text.line_of("[6379") + 2
    assert "YAML" in p.message


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n", "just a string\n"])
def test_a_document_that_is_not_a_mapping(problems, text: str) -> None:
    p = only(problems(text))
    assert p.where.startswith("inv.yaml:")
    assert "mapping" in p.message


def test_missing_required_fields_are_named(problems) -> None:
    found = problems("cluster: c\n")
    assert [p.where for p in found] == ["inv.yaml:1 hosts"]
    assert found[0].message == "is required"


def test_load_inventory_names_the_file(tmp_path: Path, example) -> None:
    bad = tmp_path / "lab.yaml"
    bad.write_text(example.edit("head: spark-a", "head: x"))
    with pytest.raises(InventoryError) as info:
        load_inventory(bad)
    assert info.value.problems[0].where.startswith(f"{bad}:")
    with pytest.raises(InventoryError) as missing:
        load_inventory(tmp_path / "absent.yaml")
    assert "cannot read" in missing.value.problems[0].message


def test_fabric_addresses_are_parsed_as_interfaces(example) -> None:
    inv = parse_inventory(example)
    assert inv.hosts[1].fabric[0].address == ipaddress.IPv4Interface("192.168.100.11/24")


# --- through the CLI -----------------------------------------------------------------------------------


@pytest.fixture
def no_connect(mocker):
    """Fail the test if anything tries to open a connection."""

    def refuse(*args, **kwargs):
        raise AssertionError("a connection was attempted")

    mocks = [
        mocker.patch.object(door, "CONNECTOR", side_effect=refuse),  # the one seam to the hosts
        mocker.patch("sparkctl.execute.ssh.connect", side_effect=refuse),
    ]
    return mocks


@pytest.mark.parametrize("offline", [True, False])
def test_cli_bad_inventory_exits_2_without_traceback_or_connection(
    tmp_path: Path, example, isolated_state, no_connect, offline: bool
) -> None:
    from sparkctl.cli.app import app

    bad = tmp_path / "bad.yaml"
    bad.write_text(example.edit("  mtu: 9000", "  mtu: 9217").edit("head: spark-a", "head: x"))
    args = ["plan", "-i", str(bad)] + (["--offline"] if offline else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert f"error: {bad}:" in result.output
    assert "network.mtu" in result.output
    for m in no_connect:
        m.assert_not_called()


def test_cli_good_inventory_plans_offline_without_connecting(tmp_path: Path, isolated_state, no_connect) -> None:
    from sparkctl.cli.app import app

    result = CliRunner().invoke(app, ["plan", "--offline", "-i", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    for m in no_connect:
        m.assert_not_called()


def _yaml_str(value: str) -> str:
    """A YAML double-quoted scalar for `value`."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t") + '"'


def test_a_ring_refuses_mixed_prefix_lengths() -> None:
    """NCCL matches subnets with one prefix length (NCCL_IB_SUBNET_PREFIX_LEN), so a ring's addresses share theirs."""
    from pathlib import Path

    import pytest

    from sparkctl.errors import InventoryError
    from sparkctl.inventory import parse_inventory

    text = (Path(__file__).resolve().parents[2] / "inventories" / "example-ring.yaml").read_text()
    first = next(line for line in text.splitlines() if "address: 192.168." in line and "/24" in line)
    with pytest.raises(InventoryError, match="mix prefix lengths"):
        parse_inventory(text.replace(first, first.replace("/24", "/25"), 1), "ring.yaml")
