"""The provenance a run records: which CPU it trained on."""

from __future__ import annotations

import platform

from pipeline.provenance import cpu_model

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC 9999
"""


def test_cpus_that_a_virtual_machine_names_alike_are_told_apart_by_family_and_model():
    assert cpu_model(ZEN4) == "AMD EPYC (family 25, model 17)"
    assert cpu_model(ZEN4.split("\n\n")[1]) == "AMD EPYC 9999 (family 26, model 2)"  # the first processor's name


def test_a_cpu_without_family_numbers_is_named_alone():
    assert cpu_model("processor\t: 0\nmodel name\t: Neoverse-N1\n") == "Neoverse-N1"


def test_no_cpuinfo_falls_back_to_the_platform():
    assert cpu_model("")  # platform.processor() or the machine's architecture, never empty
    assert cpu_model("") == (platform.processor() or platform.machine())
    assert cpu_model("processor\t: 0\ncpu family\t: 25\n") == cpu_model("")  # numbers without a name
