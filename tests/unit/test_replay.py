"""The parts of `heedful replay` and `heedful serve --record` that need no server: reading recordings,
comparing answers, framing and redaction."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from server.recording import FrameParser, Recorder, redact_value
from storage.redaction import Redactor
from tools.replay import (
    Entry,
    RecordingError,
    Replayer,
    completion_ids,
    diff_values,
    learn_ids,
    load_recording,
    read_recording,
    substitute,
)

ITEM = {
    "insertText": "return x + 1",
    "range": {"start": {"line": 3, "character": 4}, "end": {"line": 3, "character": 4}},
    "command": {"title": "Accept", "command": "heedful.acceptCompletion", "arguments": [{"completionId": "c-1"}]},
}


def test_structural_comparison_lets_the_text_differ_but_not_ranges_or_commands() -> None:
    live = json.loads(json.dumps(ITEM))
    live["insertText"] = "return x * 2"
    assert diff_values({"items": [ITEM]}, {"items": [live]}, structural=True, volatile=frozenset()) == []
    assert diff_values({"items": [ITEM]}, {"items": [live]}, structural=False, volatile=frozenset()) == [
        'items[0].insertText: recorded "return x + 1", replayed "return x * 2"'
    ]
    live["range"]["end"]["character"] = 9
    live["command"]["title"] = "Take"
    assert diff_values({"items": [ITEM]}, {"items": [live]}, structural=True, volatile=frozenset()) == [
        'items[0].command.title: recorded "Accept", replayed "Take"',
        "items[0].range.end.character: recorded 4, replayed 9",
    ]


def test_shape_differences_are_named() -> None:
    assert diff_values({"items": [ITEM]}, None, structural=True, volatile=frozenset())[0].startswith(
        "(value): recorded {"
    )
    assert diff_values({"items": [ITEM, ITEM]}, {"items": [ITEM]}, structural=True, volatile=frozenset()) == [
        "items: recorded 2 items, replayed 1"
    ]
    assert diff_values({"a": 1}, {"a": 1, "b": 2}, structural=False, volatile=frozenset()) == [
        "b: not recorded, replayed 2"
    ]
    assert diff_values({"a": True}, {"a": 1}, structural=False, volatile=frozenset()) == [
        "a: recorded true, replayed 1"
    ]
    assert diff_values({"eventId": 3}, {"eventId": 9}, structural=False, volatile=frozenset({"eventId"})) == []


def test_volatile_keys_are_not_compared_even_when_one_side_lacks_them() -> None:
    volatile = frozenset({"adapterServing"})
    recorded = {"state": "ready", "arm": "rl"}
    live = {"state": "ready", "arm": "rl", "adapterServing": "merged"}
    assert diff_values(recorded, live, structural=False, volatile=volatile) == []
    assert diff_values(live, recorded, structural=False, volatile=volatile) == []
    assert diff_values(recorded, live, structural=False, volatile=frozenset()) == [
        'adapterServing: not recorded, replayed "merged"'
    ]


def test_completion_ids_are_found_anywhere_in_an_answer() -> None:
    other = dict(ITEM, command={"command": "x", "arguments": [{"completionId": "c-2"}]})
    assert completion_ids({"items": [ITEM, other]}) == {"c-1", "c-2"}
    assert completion_ids({"items": []}) == set() and completion_ids(None) == set()


def _event(kind: str, completion: int, inferred: bool = False) -> dict[str, object]:
    return {"kind": kind, "completion": completion, "inferred": inferred, "delay_s": None, "text": None}


def test_inferred_events_count_only_for_completions_whose_text_matched() -> None:
    recorded = [_event("partial_accept", 0), _event("shown", 1)]
    live = [_event("partial_accept", 0), _event("rejected", 0, inferred=True), _event("shown", 1)]
    replayer = Replayer([], None, speed=None, timeout=1.0)  # type: ignore[arg-type]  # compares, drives nothing
    replayer.stored_events = Entry(line=9, t=0.0, direction="store", message=None, events=recorded)
    # Completion 0's text differed: the inferred reject follows from it and is left out on both sides.
    replayer.compare_events(live, frozenset({0}))
    # Completion 0's text matched: the same reject is a difference.
    replayer.compare_events(live, frozenset({1}))
    # A non-inferred event of a diverged completion still counts.
    replayer.compare_events([_event("shown", 1)], frozenset({0}))
    first, second, third = replayer.checks
    assert first.ok
    assert second.failures == [
        "stored in the replay, not in the recording: "
        '{"completion": 0, "delay_s": null, "inferred": true, "kind": "rejected", "text": null}'
    ]
    assert third.failures == [
        "stored in the recording, not in the replay: "
        '{"completion": 0, "delay_s": null, "inferred": false, "kind": "partial_accept", "text": null}'
    ]


def test_edit_snapshots_of_a_diverged_completion_are_left_out_too() -> None:
    # Completion 0's text differed: typing the recorded text departed from the live suggestion, so the live
    # server also followed what was written in its place (two more snapshots the store line cannot tell
    # from the accepted part's).
    snapshot = {"kind": "edit_snapshot", "completion": 0, "inferred": False, "delay_s": 1.0, "text": None}
    recorded = [_event("partial_accept", 0), snapshot]
    live = [_event("partial_accept", 0), _event("rejected", 0, inferred=True), snapshot, snapshot]
    replayer = Replayer([], None, speed=None, timeout=1.0)  # type: ignore[arg-type]  # compares, drives nothing
    replayer.stored_events = Entry(line=9, t=0.0, direction="store", message=None, events=recorded)
    replayer.compare_events(live, frozenset({0}))
    replayer.compare_events(live, frozenset())  # the same text: every event counts
    first, second = replayer.checks
    assert first.ok and len(second.failures) == 2


def test_the_recorded_settings_become_the_sessions_editor_settings_under_its_own(tmp_path: Path) -> None:
    recorded = {"completion": {"max_tokens": 24, "temperature": 0.0}, "feedback": {"edit_snapshot_delays_s": [1.0]}}
    path = tmp_path / "r.jsonl"
    header = {"heedful_recording": 1, "source": "serve", "settings": recorded}
    path.write_text(json.dumps(header) + "\n", encoding="utf-8")
    loaded = read_recording(path)
    assert loaded.settings == recorded and loaded.entries == []
    replayer = Replayer([], None, speed=None, timeout=1.0, settings=recorded)  # type: ignore[arg-type]
    own = {"sessionId": "s-1", "settings": {"completion": {"max_tokens": 8}}}
    initialize = {"method": "initialize", "params": {"initializationOptions": own}}
    replayer._fresh_session(initialize)
    options = initialize["params"]["initializationOptions"]  # type: ignore[index]
    assert options["sessionId"] == "s-1" + replayer.session_suffix
    assert options["settings"] == {
        "completion": {"max_tokens": 8, "temperature": 0.0},  # the client's own value wins
        "feedback": {"edit_snapshot_delays_s": [1.0]},
    }
    bare: dict[str, Any] = {"method": "initialize", "params": {}}
    replayer._fresh_session(bare)
    assert bare["params"]["initializationOptions"] == {"settings": recorded}


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"engine": {"mode": "remote"}}, "the header's settings = "),
        ({"feedback": {"edit_snapshot_delays_s": "soon"}}, "feedback.edit_snapshot_delays_s"),
    ],
)
def test_a_header_with_unusable_settings_is_refused(tmp_path: Path, settings: Any, error: str) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"heedful_recording": 1, "settings": settings}) + "\n", encoding="utf-8")
    with pytest.raises(RecordingError, match="record the session again") as info:
        read_recording(path)
    assert error in str(info.value) and str(info.value).startswith(f"{path}:1")


def test_ids_the_server_invented_are_learned_and_substituted() -> None:
    ids: dict[str, str] = {}
    live = json.loads(json.dumps(ITEM).replace("c-1", "c-live"))
    learn_ids({"items": [ITEM]}, {"items": [live]}, ids)
    assert ids == {"c-1": "c-live"}
    later = {"command": "heedful.acceptCompletion", "arguments": [{"completionId": "c-1"}], "other": "c-10"}
    assert substitute(later, ids) == {
        "command": "heedful.acceptCompletion",
        "arguments": [{"completionId": "c-live"}],
        "other": "c-10",
    }


def test_frames_are_cut_wherever_the_bytes_split() -> None:
    bodies = [b'{"a": 1}', json.dumps({"text": "caf\u00e9 \u2615"}).encode(), b"not json"]
    stream = b"".join(b"Content-Length: %d\r\nContent-Type: x\r\n\r\n" % len(b) + b for b in bodies)
    parser = FrameParser()
    got = [body for i in range(0, len(stream), 7) for body in parser.feed(stream[i : i + 7])]
    assert got == bodies


def test_recorder_redacts_values_and_keeps_bodies_that_are_not_json(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    recorder = Recorder(out, Redactor(["acme-[0-9]+"]), source="serve", settings={"feedback": {"x": 1}})
    recorder.record("client-to-server", json.dumps({"params": {"text": "key AKIAIOSFODNN7EXAMPLE acme-42"}}).encode())
    recorder.record("client-to-server", b"{broken ghp_" + b"a" * 36)
    recorder.close()
    header, first, second = (json.loads(line) for line in out.read_text().splitlines())
    assert header["heedful_recording"] == 1 and header["settings"] == {"feedback": {"x": 1}}
    assert first["message"] == {"params": {"text": "key [REDACTED:aws-access-key] [REDACTED:custom]"}}
    assert second["raw"] == "{broken [REDACTED:github-token]"
    assert redact_value({"n": [1, None, "acme-7"]}, Redactor(["acme-[0-9]+"])) == {"n": [1, None, "[REDACTED:custom]"]}


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("", ":1: the recording is empty"),
        ('{"t": 0, "direction": "client-to-server", "message": {}}\n', ":1: not a Heedful recording"),
        ('{"heedful_recording": 7}\n', ":1: recording format 7 is not supported"),
        ('{"heedful_recording": 1}\n{"t": -1, "direction": "client-to-server", "message": {}}\n', ":2: t = -1"),
        ('{"heedful_recording": 1}\n{"t": 0, "direction": "client-to-server"}\n', ":2: the line has neither"),
        ('{"heedful_recording": 1}\n[1, 2\n{"t": 0}\n', ":2: not valid JSON"),
        ('{"heedful_recording": 1}\n{"t": 0, "direction": "store", "events": "all"}\n', ":2: a store line needs"),
        ('{"heedful_recording": 1}\n{"t": 0, "direction": "client-to-server", "mess', ":2: the last line is cut off"),
    ],
)
def test_broken_recordings_are_refused_naming_the_line(tmp_path: Path, content: str, error: str) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(RecordingError) as info:
        load_recording(path)
    assert str(info.value).startswith(f"{path}{error}")


def test_a_missing_recording_is_named(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="does not exist"):
        load_recording(tmp_path / "nope.jsonl")


def test_a_server_that_offers_more_commands_than_recorded_still_matches() -> None:
    path = "result.capabilities.executeCommandProvider.commands"
    recorded = {"result": {"capabilities": {"executeCommandProvider": {"commands": ["a", "b"]}}}}
    grown = {"result": {"capabilities": {"executeCommandProvider": {"commands": ["b", "a", "c"]}}}}
    shrunk = {"result": {"capabilities": {"executeCommandProvider": {"commands": ["b", "c"]}}}}
    assert diff_values(recorded, grown, structural=False, volatile=frozenset()) == []
    assert diff_values(recorded, shrunk, structural=False, volatile=frozenset()) == [
        f'{path}: recorded ["a"], missing in the replay'
    ]
    # Other lists still compare item by item.
    assert diff_values({"xs": [1, 2]}, {"xs": [1, 2, 3]}, structural=False, volatile=frozenset()) == [
        "xs: recorded 2 items, replayed 3"
    ]


def test_a_server_that_offers_a_capability_more_than_recorded_still_matches() -> None:
    recorded = {"result": {"capabilities": {"hoverProvider": True, "textDocumentSync": {"change": 2}}}}
    grown = {"result": {"capabilities": {"hoverProvider": True, "textDocumentSync": {"change": 2}, "x": True}}}
    assert diff_values(recorded, grown, structural=False, volatile=frozenset()) == []
    # A recorded capability gone, or one answered otherwise, is a difference; so is a key more inside one.
    gone = {"result": {"capabilities": {"textDocumentSync": {"change": 2}, "x": True}}}
    assert diff_values(recorded, gone, structural=False, volatile=frozenset()) == [
        "result.capabilities.hoverProvider: recorded true, missing in the replay"
    ]
    deeper = {"result": {"capabilities": {"hoverProvider": True, "textDocumentSync": {"change": 2, "save": True}}}}
    assert diff_values(recorded, deeper, structural=False, volatile=frozenset()) == [
        "result.capabilities.textDocumentSync.save: not recorded, replayed true"
    ]
    # Elsewhere a key more is a difference as before.
    assert diff_values({"a": {}}, {"a": {"b": 1}}, structural=False, volatile=frozenset()) == [
        "a.b: not recorded, replayed 1"
    ]
