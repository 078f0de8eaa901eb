"""Tests of amft_trl.tasks.virl on a small fixture generated in the reference's data layout."""

from __future__ import annotations

import json
import os
import pickle

import pytest
from _virl_fixture import write_fixture

from amft_trl.tasks import virl
from amft_trl.tasks.virl import (
    VIRLDataError,
    VIRLNavigationEnv,
    build_rail,
    build_virl_datasets,
    load_virl_data,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("virl"))


def test_rail_follows_the_route(data_dir):
    data = load_virl_data(data_dir)
    instructions, rail = build_rail(data.routes[0], absolute_action=True, straight_line_length=2)
    assert [s.action for s in rail] == [
        "turn_direction(north)",
        "forward()",
        "forward()",
        "turn_direction(east)",
        "forward()",
        "forward()",
        "turn_direction(north)",
        "forward()",
        "forward()",
        "stop()",
    ]
    assert rail[3].observation == "Cafe 0 is on your left; You observe an intersection"
    assert rail[-1].observation == "Museum 0 is on your right; "
    assert instructions[:3] == [
        "First, turn left to face north.",
        "Move forward until you reach next intersection where Cafe 0 is on your left.",
        "Turn right to face east.",
    ]
    assert instructions[-1] == "Move forward until you reach destination where Museum 0 is on your right."
    assert rail[1].instruction == instructions[1] and rail[-1].instruction == instructions[-1]
    # Relative actions: from 180 to 0 is a half turn (left after wrapping), 0 -> 90 right, 90 -> 0 left.
    _, relative = build_rail(data.routes[0], absolute_action=False, straight_line_length=2)
    assert [s.action for s in relative if s.action != "forward()"] == [
        "turn_direction(left)",
        "turn_direction(right)",
        "turn_direction(left)",
        "stop()",
    ]


@pytest.mark.parametrize("absolute", [True, False])
def test_ground_truth_actions_reach_the_destination(data_dir, absolute):
    env = VIRLNavigationEnv(load_virl_data(data_dir), verify_iter=2)
    first = env.reset(route_index=1, absolute_action=absolute)
    assert first.startswith("O_1: No landmarks nearby")
    steps = list(env.rail)
    replies = [env.take_action(s.action, s.observation, s.instruction) for s in steps]
    assert env.success and env.finished and replies[-1].endswith("You reached the destination.")
    assert env.get_reward() == len(steps) * 1.0
    assert "A_1: " + steps[0].action in replies[0]


def test_wrong_actions_fail(data_dir):
    env = VIRLNavigationEnv(load_virl_data(data_dir), verify_iter=2)
    env.reset(route_index=0)
    assert "incorrect action" in env.take_action("forward()", "No landmarks nearby")
    assert "navigation failed" in env.take_action("stop()", "No landmarks nearby")
    assert env.finished and not env.success and env.get_reward() == -2.0
    assert env.take_action("turn_direction(north)") == "The navigation is over." and env.get_reward() == -2.0
    # Claiming an intersection where there is none scores -1.5; a right action after a wrong one still moves on.
    env.reset(route_index=0)
    assert env.take_action("forward()", "You observe an intersection").startswith(
        "You failed because you are not"
    )
    env.take_action("turn_direction(north)", "")
    assert env.scores == [-1.5, 1.0] and env.position == 1 and not env.finished
    # Stopping early is wrong, and so is a relative action in the absolute space.
    env.reset(route_index=0, absolute_action=True)
    env.take_action("turn_direction(left)")
    assert env.scores == [-1.0]


def test_step_reward_reads_the_reference_json():
    text = (
        '{"current observation": "No landmarks nearby; ", "current instruction": "1.", "action": "forward()"}'
    )
    assert virl.virl_step_reward(text, "forward()", "No landmarks nearby; ")[0] == 1.0
    assert virl.virl_step_reward(text, "stop()", "Museum; You observe an intersection")[0] == -1.5
    assert virl.virl_step_reward("garbage" * 10_000, "stop()", "x")[0] == -1.0


def test_vision_language_observations(data_dir):
    env = VIRLNavigationEnv(load_virl_data(data_dir, vision=True), resolution=32)
    env.reset(route_index=0, vision=True)
    image = env.observation_image()
    assert image.size == (69, 69)
    step = env.rail[0]
    reply = env.take_action(step.action, step.observation)
    assert (
        isinstance(reply, list)
        and reply[0]["type"] == "image"
        and "O_2: You observe an image" in reply[1]["text"]
    )
    assert reply[0]["image"].tobytes() != image.tobytes()  # moved: another panorama / heading


def test_datasets_and_splits(data_dir, tmp_path):
    other = write_fixture(tmp_path / "other-city", n_routes=2, vision=False)
    d = build_virl_datasets(data_dir, 1, 1, 1, ood_path=other)
    routes = [set(x["route_index"]) for x in (d.rl, d.validation, d.eval_id)]
    assert all(len(r) == 1 for r in routes) and len(set.union(*routes)) == 3
    assert d.eval_ood_rule["route_index"] == d.eval_id["route_index"]
    assert (
        d.eval_ood_rule[0]["absolute_action"] is False
        and "'slightly left'" in d.eval_ood_rule[0]["prompt"][0]["content"]
    )
    assert len(d.eval_ood_visual) == 1
    v = build_virl_datasets(data_dir, 1, 1, 1, vision=True, resolution=16)
    assert v.rl[0]["images"][0].size == (37, 37) and v.rl[0]["prompt"][0]["content"][0]["type"] == "image"
    with pytest.raises(
        VIRLDataError, match=r"cannot build the splits: .* has 3 routes, the splits ask for 4"
    ) as err:
        build_virl_datasets(data_dir, 2, 1, 1)
    assert "\n" not in str(err.value)
    with pytest.raises(VIRLDataError, match="cannot build the visual OOD split"):
        build_virl_datasets(data_dir, 1, 1, 1, ood_path=write_fixture(tmp_path / "tiny", 0, vision=False))


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_or_incomplete_data_is_one_line_naming_the_file(tmp_path):
    with pytest.raises(VIRLDataError) as err:
        load_virl_data(str(tmp_path / "nowhere"))
    assert "is not a folder" in one_line(err)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VIRLDataError) as err:
        load_virl_data(str(empty))
    assert one_line(err).endswith("missing %s (the route info JSON)." % (empty / "route_infos.json"))
    text_only = write_fixture(tmp_path / "text", vision=False)
    load_virl_data(text_only)  # enough for the language variant
    with pytest.raises(VIRLDataError) as err:
        load_virl_data(text_only, vision=True)
    assert "gps_pano_mapping.pkl" in one_line(err)
    full = write_fixture(tmp_path / "full")
    os.rename(os.path.join(full, "street_views"), os.path.join(full, "moved"))
    with pytest.raises(VIRLDataError) as err:
        load_virl_data(full, vision=True)
    assert "street_views" in one_line(err)
    broken = write_fixture(tmp_path / "broken", vision=False)
    with open(os.path.join(broken, "route_infos.json"), "w") as f:
        json.dump([[{"start_place": {}}], 1], f)
    with pytest.raises(VIRLDataError) as err:
        load_virl_data(broken)
    assert "route 0 has no 'dest_place'" in one_line(err)


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_hostile_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_fixture(tmp_path / "hostile")
    with open(os.path.join(path, "gps_pano_mapping.pkl"), "wb") as f:
        pickle.dump({(1.0, 2.0): Exploit()}, f)
    with pytest.raises(VIRLDataError) as err:
        load_virl_data(path, vision=True)
    assert "refusing to load" in one_line(err) and "system" in str(err.value)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("vision", [False, True])
def test_demonstrations_are_the_ground_truth_episode_as_tool_calls(data_dir, vision):
    d = build_virl_datasets(data_dir, 2, 0, 1, vision=vision, resolution=16)
    assert len(d.sft) == 2
    for demo, prompt in zip(d.sft, d.rl):
        env = VIRLNavigationEnv(load_virl_data(data_dir, vision=vision), resolution=16)
        env.reset(route_index=prompt["route_index"], vision=vision)
        calls = [m["tool_calls"][0]["function"]["arguments"] for m in demo["completion"] if m["tool_calls"]]
        assert [c["action"] for c in calls] == [s.action for s in env.rail]
        for args in calls:
            env.take_action(**args)
        assert env.success
        tools = [m for m in demo["completion"] if m["role"] == "tool"]
        if vision:  # one image for the prompt, one per reply that shows a new view
            assert len(demo["images"]) == 1 + sum(1 for m in tools if m["content"][0]["type"] == "image")
        else:
            assert "images" not in d.sft.column_names
            assert demo["prompt"][0]["content"].endswith(prompt["first_observation"])
