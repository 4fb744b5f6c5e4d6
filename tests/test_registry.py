"""The one registry: each job-file union in schema.py and its registry name the same classes; the lookup's message."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from segjob.data import DATASETS
from segjob.errors import UserError
from segjob.job.registry import Entry, Registry
from segjob.job.schema import (
    BCEConfig,
    BinaryOutput,
    DataConfig,
    EncoderName,
    LossConfig,
    ModelConfig,
    PSPNetConfig,
    ScheduleConfig,
    UNetConfig,
)
from segjob.learning.losses import LOSSES, binary_threshold
from segjob.learning.optim import SCHEDULES
from segjob.models import ENCODERS, MODELS


def union_members(union: object) -> dict[str, type]:
    """{name tag: class} of an Annotated[Union[...], Field(discriminator="name")]."""
    members = typing.get_args(typing.get_args(union)[0])
    assert members, f"{union} is not a union of classes"
    return {member.model_fields["name"].default: member for member in members}


FAMILIES = {"model": (ModelConfig, MODELS), "loss": (LossConfig, LOSSES), "data": (DataConfig, DATASETS),
            "schedule": (ScheduleConfig, SCHEDULES)}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_union_member_has_a_registry_entry(family):
    union, registry = FAMILIES[family]
    missing = {name: member.__name__ for name, member in union_members(union).items()
               if name not in registry or registry[name].config_class is not member}
    assert not missing, f"{family}: these schema classes have no registry entry (or another class's): {missing}"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_registry_entry_is_a_union_member(family):
    union, registry = FAMILIES[family]
    members = union_members(union)
    orphans = {name: entry.config_class.__name__ for name, entry in registry.items()
               if members.get(name) is not entry.config_class}
    assert not orphans, f"{family}: these registry entries are not in the schema's union: {orphans}"


def test_every_encoder_the_schema_names_is_registered_and_back():
    assert set(typing.get_args(EncoderName)) == set(ENCODERS)


# --- the lookup ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Thing(Entry):
    size: int = 0


THINGS = Registry("model", [Thing("unet", UNetConfig), Thing("pspnet", PSPNetConfig)], where="model.name")


def test_lookup_finds_an_entry_and_the_registry_reads_as_a_dict():
    assert THINGS.lookup("pspnet") is THINGS["pspnet"]
    assert list(THINGS) == ["unet", "pspnet"] and len(THINGS) == 2 and "unet" in THINGS
    assert THINGS.get("segnet") is None  # a plain miss, as a dict's


def test_unknown_name_says_the_key_the_closest_name_and_every_valid_one():
    with pytest.raises(UserError) as error:
        THINGS.lookup("unett")
    assert str(error.value) == "model.name: unknown model 'unett' (did you mean 'unet'?); valid: pspnet, unet"


def test_a_name_close_to_none_gets_no_hint():
    with pytest.raises(UserError, match=r"^model\.name: unknown model 'xyz'; valid: pspnet, unet$"):
        THINGS.lookup("xyz")


def test_the_message_options_each_family_keeps():
    registered_order = Registry("thing", [Thing("unet", UNetConfig), Thing("pspnet", PSPNetConfig)],
                                suggest=False, sort_valid=False, error=ValueError)
    with pytest.raises(ValueError) as error:
        registered_order.lookup("unett")
    assert str(error.value) == "unknown thing 'unett'; valid: unet, pspnet"


def test_the_real_families_word_it_the_same_way():
    for registry, prefix in ((MODELS, "model.name: unknown model"), (LOSSES, "loss.name: unknown loss"),
                             (DATASETS, "data.name: unknown dataset"),
                             (SCHEDULES, "optim.schedule.name: unknown schedule"), (ENCODERS, "unknown encoder")):
        with pytest.raises((UserError, ValueError), match=rf"^{prefix} 'nope'"):
            registry.lookup("nope")
    with pytest.raises(UserError, match=r"unknown schedule 'cosinus' \(did you mean 'cosine'\?\); valid: constant, "):
        SCHEDULES.lookup("cosinus")


def test_an_entry_must_carry_its_config_classs_tag():
    with pytest.raises(ValueError, match="Thing 'unet2' is registered with a config whose name is 'unet'"):
        Thing("unet2", UNetConfig)


def test_a_name_registered_twice_is_refused():
    with pytest.raises(ValueError, match="model 'unet' is registered twice"):
        Registry("model", [Thing("unet", UNetConfig), Thing("unet", UNetConfig, size=1)])


# --- the binary threshold -----------------------------------------------------------------


def test_binary_threshold_is_the_loss_threshold_else_the_schemas_default():
    assert binary_threshold(BCEConfig(threshold=0.3)) == 0.3
    assert binary_threshold(SimpleNamespace(name="ce")) == BinaryOutput.model_fields["threshold"].default == 0.5
