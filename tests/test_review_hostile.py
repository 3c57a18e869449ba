"""Hostile answer files for `review import`: every malformed Label Studio export or filled CSV is
one escaped line naming what is wrong, never a traceback, never a wrong answer taken (no Ray, no
files: the parsers and the validation against an in-memory batch)."""

from __future__ import annotations

import json

import pytest

from fpc_ray.errors import UserError
from fpc_ray.review.importer import Batch, validate
from fpc_ray.review.labelstudio import parse_export, parse_filled_csv

FID = "0123456789abcdef"
BATCH = Batch("batches/b1", None, {FID: {"source_uri": "/archive/a.png", "frame": 0, "label": "Other"}})


def _item(plane, name="plane") -> dict:
    return {"from_name": name, "to_name": "image", "type": "choices", "value": {"choices": [plane]}}


def _export(annotations=None, frame_id=FID, **task) -> str:
    annotations = [{"result": [_item("Other")], "was_cancelled": False}] if annotations is None else annotations
    return json.dumps([{"id": 1, "data": {"frame_id": frame_id}, "annotations": annotations, **task}])


HOSTILE_JSON = {
    "two planes in one annotation": (_export([{"result": [_item("Other"), _item("Fetal femur")]}]),
                                     "entry 1 (frame 0123456789abcdef): one annotation holds 2 different 'plane' "
                                     "results: 'Fetal femur', 'Other'"),
    "two brain planes in one annotation": (
        _export([{"result": [_item("Fetal brain"), _item("Trans-thalamic", "brain_plane"),
                             _item("Trans-cerebellum", "brain_plane")]}]), "2 different 'brain_plane' results"),
    "was_cancelled a string": (_export([{"result": [_item("Other")], "was_cancelled": "false"}]),
                               "'was_cancelled' must be true or false, got 'false'"),
    "was_cancelled a number": (_export([{"result": [], "was_cancelled": 0}]), "must be true or false, got 0"),
    "was_cancelled null": (_export([{"result": [], "was_cancelled": None}]), "must be true or false, got None"),
    "a 5000-digit number": (_export(id="BIG").replace('"BIG"', "7" * 5000), "an integer of 5000 digits"),
    "a 5000-digit negative number in a result": (
        _export([{"result": [{**_item("Other"), "score": "BIG"}]}]).replace('"BIG"', "-" + "9" * 5000),
        "an integer of 5000 digits"),
    "nested past the limit": ("[" * 200 + "]" * 200, "nested deeper than 64 levels"),
    "deep inside a task": (_export(meta=json.loads("[" * 80 + "]" * 80)), "nested deeper than 64 levels"),
    "empty": ("  ", "empty"),
    "not a list": ('{"data": {}}', "expected Label Studio's JSON export, a list of tasks"),
    "null": ("null", "expected Label Studio's JSON export"),
    "a task that is not an object": ("[5]", "entry 1: no data.frame_id"),
    "a frame id that is a number": (_export(frame_id=123), "entry 1: no data.frame_id"),
    "a frame id that is a list": (_export(frame_id=[FID]), "entry 1: no data.frame_id"),
    "annotations not a list": (_export({"result": []}), "'annotations' is not a list of objects"),
    "annotations null": (json.dumps([{"data": {"frame_id": FID}, "annotations": None}]),
                         "'annotations' is not a list of objects"),
    "an annotation not an object": (_export(["Other"]), "'annotations' is not a list of objects"),
    "result not a list": (_export([{"result": "Other"}]), "the annotation's 'result' is not a list"),
    "a result item not an object": (_export([{"result": [_item("Other"), "Other"]}]),
                                    "an item of the annotation's 'result' is not an object, got 'Other'"),
    "choices not a list": (_export([{"result": [{"from_name": "plane", "value": {"choices": "Other"}}]}]),
                           "'plane' must hold exactly one choice, got 'Other'"),
    "choices not strings": (_export([{"result": [{"from_name": "plane", "value": {"choices": [3]}}]}]),
                            "'plane' must hold exactly one choice, got [3]"),
    "two choices": (_export([{"result": [{"from_name": "plane", "value": {"choices": ["Other", "Other"]}}]}]),
                    "exactly one choice"),
    "value not an object": (_export([{"result": [{"from_name": "plane", "value": ["Other"]}]}]),
                            "exactly one choice, got None"),
    "a huge choice": (_export([{"result": [{"from_name": "plane", "value": {"choices": [["x" * 10**5]]}}]}]),
                      "exactly one choice, got [['xxxx"),
    "JSON-MIN two choices": (json.dumps([{"frame_id": FID, "plane": {"choices": ["Other", "Fetal femur"]}}]),
                             "'plane' must hold exactly one choice, got ['Other', 'Fetal femur']"),
    "JSON-MIN a number": (json.dumps([{"frame_id": FID, "plane": 4}]), "exactly one choice, got 4"),
    "a frame id forging a line": (_export(frame_id="x\nerror: \x1b[31mok\u202e"),
                                  r"entry 1 (frame x\nerror: \x1b[31mok\u202e): frame not in batch"),
    "a class forging a line": (_export([{"result": [_item("Other\n\x1b[2J")]}]),
                               r"unknown class 'Other\n\x1b[2J'"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_JSON))
def test_a_hostile_label_studio_export_is_one_escaped_line(case):
    text, needle = HOSTILE_JSON[case]
    with pytest.raises(UserError) as err:
        validate(parse_export(text, "export.json"), BATCH)
    message = str(err.value)
    assert message.startswith("export.json") and needle in message, message
    assert message.isprintable() and len(message) < 600, message  # one line, no escapes, not a page


def test_what_an_export_may_hold_is_read_as_it_means():
    cancelled = [{"result": [_item("Other")], "was_cancelled": True}]
    assert validate(parse_export(_export(cancelled), "e.json"), BATCH)[1]["skipped"] == 1
    answered = [{"result": [_item("Other")], "was_cancelled": False}, {"result": [_item("Other")]}]
    labelled, counts = validate(parse_export(_export(answered), "e.json"), BATCH)
    assert labelled[FID].plane == "Other" and counts["reviewed"] == 1
    same_twice = [{"result": [_item("Other"), _item("Other")]}]  # one choice, given twice: one answer
    assert validate(parse_export(_export(same_twice), "e.json"), BATCH)[0][FID].plane == "Other"
    long_float = _export(id="BIG").replace('"BIG"', "7" * 5000 + ".5")  # a float: no digit limit to trip
    assert validate(parse_export(long_float, "e.json"), BATCH)[0][FID].plane == "Other"


HEADER = "frame_id,source_uri,frame,study_uid,predicted,confidence,label,brain_plane"
HOSTILE_CSV = {
    "a 5000-digit frame": (f"{FID},/archive/a.png,{'5' * 5000},,Other,0.5,Other,", "'frame' must be a frame index"),
    "a negative frame": (f"{FID},/archive/a.png,-1,,Other,0.5,Other,",
                         "'frame' must be a frame index (at most 9 digits), got '-1'"),
    "a fractional frame": (f"{FID},/archive/a.png,1.5,,Other,0.5,Other,", "got '1.5'"),
    "a frame in other digits": (f"{FID},/archive/a.png,\u0663,,Other,0.5,Other,", "got '\u0663'"),
    "a frame id forging a line": ('"x\nerror: \x1b[31mok",/archive/a.png,0,,Other,0.5,Other,',
                                  r"line 2 (frame x\nerror: \x1b[31mok): frame not in batch"),
    "a huge frame id": (f"{'f' * 10**5},/archive/a.png,0,,Other,0.5,Other,", "ffff...): frame not in batch"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CSV))
def test_a_hostile_filled_csv_is_one_escaped_line(case):
    row, needle = HOSTILE_CSV[case]
    with pytest.raises(UserError) as err:
        validate(parse_filled_csv(f"{HEADER}\n{row}\n", "tasks.csv"), BATCH)
    message = str(err.value)
    assert message.startswith("tasks.csv") and needle in message, message
    assert message.isprintable() and len(message) < 600, message
