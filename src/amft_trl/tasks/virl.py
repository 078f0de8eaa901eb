"""V-IRL navigation (AMFT paper, appendix C, Figure 5; the environment of "SFT Memorizes, RL Generalizes",
arXiv 2501.17161, github LeslieTrue/SFTvsRL, `gym_virl`), read from a local copy of the released data.

The agent follows a route through a city, one action per turn: it is given the route's instructions and its
observation (the language variant: the oracle text "<landmark>; You observe an intersection"; the vision-language
variant: four street views in a 2x2 grid), and answers with the reference's JSON
`{"current observation": ..., "current instruction": ..., "action": ...}`. Actions are `forward()`,
`turn_direction(x)` and `stop()`; x is a compass direction (the absolute action space, training) or `left`,
`right`, `slightly left`, `slightly right` (the relative action space: the reference's rule OOD).

Each answer is scored by the reference's per-step verifier (`virl_step_reward`: +1 for the ground-truth action,
-1.5 for claiming or missing an intersection, -1 for another wrong action). A correct action moves the agent along
the route's "rail" (the ground-truth positions); a wrong one is answered with the verifier's message, and after
`verify_iter` wrong answers at one position the episode fails. Success is stopping at the destination.

Data layout (the hub dataset `tianzhechu/SFTvsRL_Data`, e.g. its `nyc_1k_routes/` folder), read by
`load_virl_data(path)`:

- `route_infos.json`: `[routes, number_of_routes]`; each route has `start_place.relocated_geocode`,
  `dest_place` (`name`, `geocode`), `route_results.geocode_list` (one geocode per intersection, the destination
  last), `route_results.landmark_list`, and `milestone_info` (text blocks `{ "landmarks": ...,
  "to_next_intersection_heading": "177 (south)" }`, one per intersection); optional `init_heading`.
- `gps_pano_mapping.pkl` (vision-language only): a dict `{(lat, lng): panorama id}`. A pickle can run code when
  loaded; `load_gps_pano_mapping` uses an unpickler that refuses every global except a few numeric constructors,
  so a hostile file fails to load instead of running code. A JSON file (`[[lat, lng, pano_id], ...]`) works too.
- `street_views/` (vision-language only): `<pano_id>.jpg` equirectangular panoramas with
  `<pano_id>.metadata.json` holding their `rotation` (degrees from north).

Differences from the reference, on purpose: no online Google Maps (positions are never relocated through the API:
the rail is the route's own geocodes with `straight_line_length` interpolated points between intersections, and
each rail position's view comes from the nearest mapped panorama within `MAPPING_RADIUS_M`); no `drop_rate`; the
views are cylindrical crops of the panorama, not perspective projections; relative headings are wrapped into
(-180, 180] (the reference subtracts raw degrees, so 350 -> 10 reads as a left turn); the verifier compares the
model's observation with the full oracle observation (landmark and intersection; the reference compares with the
landmark text only, which never mentions an intersection); an episode ends when a position's attempts run out (the
reference moves on without a chance of success); an episode without an answer scores -1 (one wrong action).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset

__all__ = [
    "ABSOLUTE_DIRECTIONS",
    "VIRLDataError",
    "VIRLDatasets",
    "action_space",
    "virl_demonstration",
    "MAPPING_RADIUS_M",
    "RELATIVE_DIRECTIONS",
    "VIRL_REWARD_TABLE",
    "RailStep",
    "VIRLData",
    "VIRLNavigationEnv",
    "build_rail",
    "build_virl_datasets",
    "load_gps_pano_mapping",
    "split_route_indices",
    "virl_prompt_dataset",
    "load_virl_data",
    "virl_env_factory",
    "virl_step_reward",
]

#: The reference's per-step scores (`REWARD_FN_VIRL`; its INCORRECT_INSTRUCTION is never used there or here).
VIRL_REWARD_TABLE: dict[str, float] = {"CORRECT_ACTION": 1.0, "INCORRECT_ACTION": -1.0, "INCORRECT_OBS": -1.5}
ABSOLUTE_DIRECTIONS = ("north", "northeast", "east", "southeast", "south", "southwest", "west", "northwest")
RELATIVE_DIRECTIONS = ("left", "right", "slightly left", "slightly right")
#: A rail position's panorama is the nearest mapped one within this distance (the reference's MAPPING_RADIUS).
MAPPING_RADIUS_M = 20.0
#: Verified answers per position in the reference's V-IRL configs (`verify_iter: 2`).
VERIFY_ITER = 2
ROUTE_FILE, MAPPING_FILE, VIEWS_DIR = "route_infos.json", "gps_pano_mapping.pkl", "street_views"
INTERSECTION_OBS = "You observe an intersection"
NO_LANDMARK = "No landmarks nearby"


class VIRLDataError(ValueError):
    """A V-IRL data folder that is missing, incomplete or malformed (one line, naming the file)."""


# ---------------------------------------------------------------------------------------- data


class _SafeUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("builtins", "tuple"),
        ("builtins", "list"),
        ("builtins", "dict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "float"),
        ("builtins", "int"),
        ("builtins", "str"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_gps_pano_mapping(path: str) -> dict[tuple[float, float], str]:
    """The GPS-to-panorama mapping: a pickled `{(lat, lng): pano_id}` dict (loaded without running code: only
    containers, numbers and strings are accepted) or a JSON list of `[lat, lng, pano_id]`.

    Raises:
        VIRLDataError: when the file is missing, cannot be read, or is not such a mapping.
    """
    if not os.path.isfile(path):
        raise VIRLDataError(f"V-IRL data: missing {path} (the GPS-to-panorama mapping).")
    try:
        if path.endswith(".json"):
            with open(path) as f:
                mapping = {(float(lat), float(lng)): str(pano) for lat, lng, pano in json.load(f)}
        else:
            with open(path, "rb") as f:
                raw = _SafeUnpickler(io.BytesIO(f.read())).load()
            if not isinstance(raw, dict):
                raise TypeError(f"a {type(raw).__name__}, not a dict")
            mapping = {(float(k[0]), float(k[1])): str(v) for k, v in raw.items()}
    except Exception as error:  # noqa: BLE001 - any failure is one line naming the file
        raise VIRLDataError(
            f"V-IRL data: cannot read {path} as a GPS-to-panorama mapping ({type(error).__name__}: {error})."
        ) from None
    return mapping


@dataclass
class VIRLData:
    """A V-IRL data folder: its routes, and (vision-language) its panorama mapping and street-view folder."""

    path: str
    routes: list[dict[str, Any]]
    mapping: dict[tuple[float, float], str] | None = None
    views_dir: str | None = None
    _panoramas: dict[str, Any] = field(default_factory=dict, repr=False)

    def panorama(self, pano_id: str) -> tuple[Any, float]:
        """The panorama image (PIL) and its rotation from north, in degrees."""
        if pano_id not in self._panoramas:
            from PIL import Image

            image_path = os.path.join(self.views_dir or "", f"{pano_id}.jpg")
            meta_path = os.path.join(self.views_dir or "", f"{pano_id}.metadata.json")
            for needed in (image_path, meta_path):
                if not os.path.isfile(needed):
                    raise VIRLDataError(f"V-IRL data: missing {needed} (a street view of the mapping).")
            with open(meta_path) as f:
                rotation = float(json.load(f).get("rotation", 0.0))
            self._panoramas[pano_id] = (Image.open(image_path).convert("RGB"), rotation)
        return self._panoramas[pano_id]


_ROUTE_KEYS = ("start_place", "dest_place", "route_results", "milestone_info")


def load_virl_data(path: str, *, vision: bool = False) -> VIRLData:
    """Read a V-IRL data folder in the reference's layout (see the module docstring).

    Raises:
        VIRLDataError: one line naming the missing or malformed file (or route and key).
    """
    if not os.path.isdir(path):
        raise VIRLDataError(
            f"V-IRL data: {path} is not a folder (expected {ROUTE_FILE}, {MAPPING_FILE}, {VIEWS_DIR}/)."
        )
    route_path = os.path.join(path, ROUTE_FILE)
    if not os.path.isfile(route_path):
        raise VIRLDataError(f"V-IRL data: missing {route_path} (the route info JSON).")
    try:
        with open(route_path) as f:
            payload = json.load(f)
        routes = payload[0]
        if not isinstance(routes, list):
            raise TypeError("its first item is not a list of routes")
    except Exception as error:  # noqa: BLE001
        raise VIRLDataError(
            f"V-IRL data: {route_path} is not [routes, number_of_routes] ({type(error).__name__}: {error})."
        ) from None
    for i, route in enumerate(routes):
        missing = [k for k in _ROUTE_KEYS if not isinstance(route, dict) or k not in route]
        if missing:
            raise VIRLDataError(f"V-IRL data: {route_path} route {i} has no {missing[0]!r}.")
    data = VIRLData(path=path, routes=routes)
    if vision:
        views = os.path.join(path, VIEWS_DIR)
        mapping_path = os.path.join(path, MAPPING_FILE)
        if not os.path.isfile(mapping_path) and os.path.isfile(mapping_path[:-4] + ".json"):
            mapping_path = mapping_path[:-4] + ".json"
        data.mapping = load_gps_pano_mapping(mapping_path)
        if not os.path.isdir(views):
            raise VIRLDataError(f"V-IRL data: missing {views}/ (the street-view images).")
        data.views_dir = views
    return data


# ---------------------------------------------------------------------------------------- routes


def _distance_m(a: Sequence[float], b: Sequence[float]) -> float:
    """Great-circle distance in metres (haversine)."""
    lat1, lng1, lat2, lng2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lng2 - lng1) / 2) ** 2
    return 2 * 6_371_000 * math.asin(min(1.0, math.sqrt(h)))


def _milestones(text: str) -> list[dict[str, str]]:
    """The `milestone_info` blocks as dicts (one `key: value` per line, quotes and trailing commas stripped)."""
    blocks = []
    for block in str(text).split("}"):
        block = block.strip().lstrip("{").strip()
        entry = {}
        for line in block.splitlines():
            key, sep, value = line.strip().rstrip(",").partition(":")
            if sep:
                entry[key.strip().strip("\"'")] = value.strip().strip("\"'")
        if entry:
            blocks.append(entry)
    return blocks


def _relative(delta: float) -> str:
    delta = (delta + 180.0) % 360.0 - 180.0  # wrapped into [-180, 180)
    if delta < -45:
        return "left"
    if delta > 45:
        return "right"
    return "slightly left" if delta <= 0 else "slightly right"


@dataclass(frozen=True)
class RailStep:
    """One ground-truth position of a route: where, facing where, the action to take there, what is seen."""

    geocode: tuple[float, float]
    heading: float
    action: str
    observation: str
    instruction: str


def build_rail(
    route: dict[str, Any],
    *,
    absolute_action: bool = True,
    straight_line_length: int = 2,
    seed: int = 0,
) -> tuple[list[str], list[RailStep]]:
    """The route's instructions and its rail: the start, `straight_line_length` `forward()` points between
    consecutive intersections more than 5 m apart, each intersection (a turn), and the destination (`stop()`).

    Raises:
        VIRLDataError: when the route's milestones and geocodes do not line up.
    """
    blocks = _milestones(route["milestone_info"])
    geocodes = [tuple(map(float, g)) for g in route["route_results"]["geocode_list"]]
    if not blocks or len(blocks) != len(geocodes):
        raise VIRLDataError(
            f"V-IRL route: {len(blocks)} milestones for {len(geocodes)} geocodes (expected one per intersection)."
        )
    init = float(route.get("init_heading") or random.Random(f"virl/{seed}/{geocodes[0]}").randint(1, 359))
    headings, turns, relatives, landmarks, instructions = [init], [], [], [], []
    for i, block in enumerate(blocks):
        spec = block.get("to_next_intersection_heading", "")
        match = re.match(r"\s*(-?\d+(?:\.\d+)?)\s*\((\w+)\)", spec)
        if match is None or match.group(2) not in ABSOLUTE_DIRECTIONS:
            raise VIRLDataError(
                f"V-IRL route: milestone {i} has no heading like '177 (south)', got {spec!r}."
            )
        degrees, direction = float(match.group(1)), match.group(2)
        relative = _relative(degrees - headings[-1])
        headings.append(degrees)
        turns.append(f"turn_direction({direction})")
        relatives.append(f"turn_direction({relative})")
        landmark = block.get("landmarks", "No landmark nearby")
        landmarks.append(landmark)
        opener = "First, turn" if i == 0 else "Turn"
        instructions.append(f"{opener} {relative} to face {direction}.")
        if i == len(blocks) - 1:
            instructions.append(f"Move forward until you reach destination where {landmark}.")
        elif landmark == "No landmark nearby":
            instructions.append("Move forward until you reach next intersection.")
        else:
            instructions.append(f"Move forward until you reach next intersection where {landmark}.")
    actions = (turns if absolute_action else relatives) + ["stop()"]
    seen = [NO_LANDMARK, *landmarks]
    start = tuple(map(float, route["start_place"]["relocated_geocode"]))
    rail: list[RailStep] = []
    previous = start
    for k, geocode in enumerate([start, *geocodes]):
        if k > 0 and _distance_m(previous, geocode) > 5:
            for j in range(1, straight_line_length + 1):
                t = j / (straight_line_length + 1)
                point = (previous[0] * (1 - t) + geocode[0] * t, previous[1] * (1 - t) + geocode[1] * t)
                rail.append(
                    RailStep(point, headings[k], "forward()", f"{NO_LANDMARK}; ", instructions[2 * k - 1])
                )
        is_stop = k == len(geocodes)
        observation = f"{seen[k]}; " + (INTERSECTION_OBS if 0 < k and not is_stop else "")
        instruction = instructions[2 * k - 1] if is_stop else instructions[2 * k]
        rail.append(RailStep(geocode, headings[k], actions[k], observation, instruction))
        previous = geocode
    return instructions, rail


# ---------------------------------------------------------------------------------------- verifier

_FIELD_RES = {
    key: re.compile(rf'"{key}"\s*:\s*"([^"\n]{{0,300}})"') for key in ("action", "current observation")
}


def _field(text: str, key: str) -> str:
    text = text[-4000:] if isinstance(text, str) else ""
    for match in reversed(re.findall(r"\{[^{}]{0,2000}\}", text)):
        try:
            obj = json.loads(match)
        except ValueError:
            continue
        if isinstance(obj, dict) and key in obj:
            return str(obj[key])
    hits = _FIELD_RES[key].findall(text)
    return hits[-1] if hits else "None"


def virl_step_reward(answer: str | dict[str, Any], gt_action: str, gt_observation: str) -> tuple[float, str]:
    """The reference's per-step verifier: `(score, message)`.

    +1 when the answer's `action` is the ground truth; otherwise -1.5 when its `current observation` claims an
    intersection that is not there or misses one that is, else -1. `answer` is the model's text or a dict with
    `action` and `current observation`.
    """
    if isinstance(answer, dict):
        action, observation = str(answer.get("action")), str(answer.get("current observation", ""))
    else:
        action, observation = _field(answer, "action"), _field(answer, "current observation")
    if action.strip() == gt_action:
        return VIRL_REWARD_TABLE["CORRECT_ACTION"], "Correct action."
    claims, present = "intersection" in observation, "intersection" in gt_observation
    if claims and not present:
        return VIRL_REWARD_TABLE["INCORRECT_OBS"], "you are not at any intersection. Please try again."
    if present and not claims:
        return VIRL_REWARD_TABLE["INCORRECT_OBS"], "you are at an intersection. Please try again."
    return VIRL_REWARD_TABLE["INCORRECT_ACTION"], "you made an incorrect action. Please try again."


# ---------------------------------------------------------------------------------------- episodes


def action_space(absolute_action: bool) -> str:
    directions = ABSOLUTE_DIRECTIONS if absolute_action else RELATIVE_DIRECTIONS
    return (
        '"forward()": move forward one step\n'
        f'"turn_direction(x)": turn towards direction x, one of {list(directions)}\n'
        '"stop()": the navigation is finished'
    )


def _views(data: VIRLData, step: RailStep, resolution: int) -> Any:
    """Four views (ahead, right, behind, left) of the nearest panorama, in a 2x2 grid with 5-pixel black lines."""
    from PIL import Image

    assert data.mapping is not None
    nearest = min(data.mapping, key=lambda g: _distance_m(g, step.geocode))
    if _distance_m(nearest, step.geocode) > MAPPING_RADIUS_M:
        raise VIRLDataError(
            f"V-IRL data: no panorama within {MAPPING_RADIUS_M:g} m of {step.geocode} in the GPS-to-panorama mapping."
        )
    pano, rotation = data.panorama(data.mapping[nearest])
    width, height = pano.size
    line = 5
    canvas = Image.new("RGB", (2 * resolution + line, 2 * resolution + line), (0, 0, 0))
    for i in range(4):
        heading = step.heading + 90 * i - rotation
        centre = (heading % 360) / 360 * width
        left = int(centre - width / 8)
        strip = Image.new("RGB", (width // 4, height // 2))
        for offset in (-width, 0, width):  # wrap around the panorama's seam
            strip.paste(pano.crop((0, height // 4, width, 3 * height // 4)), (offset - left, 0))
        view = strip.resize((resolution, resolution))
        canvas.paste(view, ((i % 2) * (resolution + line), (i // 2) * (resolution + line)))
    return canvas


class VIRLNavigationEnv:
    """One V-IRL route for TRL's multi-turn loop (`environment_factory`): `reset` receives the dataset row
    (`route_index`, `absolute_action`, `vision`), the model calls `take_action` once per turn.

    A correct action moves the agent to the next rail position (or, for `stop()` at the destination, ends the
    episode with success); a wrong one is answered with the verifier's message, and after `verify_iter` wrong
    answers at one position the episode ends in failure. `get_reward` is the sum of the per-step scores (the
    reference's episode return); `success` says whether the destination was reached.
    """

    def __init__(
        self,
        data: VIRLData,
        verify_iter: int = VERIFY_ITER,
        straight_line_length: int = 2,
        resolution: int = 256,
    ) -> None:
        if verify_iter < 1:
            raise ValueError(f"verify_iter must be >= 1, got {verify_iter}.")
        self.data, self.verify_iter = data, verify_iter
        self.straight_line_length, self.resolution = straight_line_length, resolution
        self.rail: list[RailStep] = []
        self.scores: list[float] = []
        self.finished = True
        self.success = False

    def reset(
        self,
        route_index: int = 0,
        absolute_action: bool = True,
        vision: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ) -> str:
        self.instructions, self.rail = build_rail(
            self.data.routes[int(route_index)],
            absolute_action=bool(absolute_action),
            straight_line_length=self.straight_line_length,
            seed=seed,
        )
        self.absolute_action, self.vision = bool(absolute_action), bool(vision)
        self.position, self.attempts = 0, 0
        self.history: list[tuple[str, str]] = []
        self.scores, self.finished, self.success = [], False, False
        return self.observation_text()

    @property
    def current(self) -> RailStep:
        return self.rail[self.position]

    def observation_text(self) -> str:
        """The observations and actions so far, as the reference writes them (`O_i` / `A_i` lines)."""
        lines = []
        for i, (obs, act) in enumerate(self.history):
            lines += [f"O_{i + 1}: {obs}", f"A_{i + 1}: {act}"]
        obs = self.current.observation
        if self.vision:
            obs = "You observe an image of 4 views; " + (INTERSECTION_OBS if INTERSECTION_OBS in obs else "")
        lines += [f"O_{len(self.history) + 1}: {obs}", f"A_{len(self.history) + 1}: "]
        return "\n".join(lines)

    def observation_image(self) -> Any:
        """The current street views (vision-language variant)."""
        return _views(self.data, self.current, self.resolution)

    def _reply(self, message: str) -> Any:
        text = f"{message}\n{self.observation_text()}" if not self.finished else message
        if self.vision and not self.finished:
            return [{"type": "image", "image": self.observation_image()}, {"type": "text", "text": text}]
        return text

    def take_action(self, action: str, current_observation: str = "", current_instruction: str = "") -> Any:
        """Take one navigation action.

        Args:
            action: one action from the action space: "forward()", "turn_direction(x)" or "stop()".
            current_observation: the latest observation.
            current_instruction: the instruction sentence being executed.

        Returns:
            The verifier's verdict and the next observation.
        """
        if self.finished:
            return "The navigation is over."
        step = self.current
        score, message = virl_step_reward(
            {"action": action, "current observation": current_observation}, step.action, step.observation
        )
        self.scores.append(score)
        if score == VIRL_REWARD_TABLE["CORRECT_ACTION"]:
            self.attempts = 0
            if step.action == "stop()":
                self.finished = self.success = True
                return "Correct action. You reached the destination."
            self.history.append((step.observation, step.action))
            self.position += 1
            return self._reply(message)
        self.attempts += 1
        if self.attempts >= self.verify_iter:
            self.finished = True
            return f"You failed because {message} No attempts left: the navigation failed."
        return self._reply(f"You failed because {message}")

    def get_reward(self) -> float:
        """The episode return: the sum of the per-step scores (-1 when the model never acted)."""
        return float(sum(self.scores)) if self.scores else VIRL_REWARD_TABLE["INCORRECT_ACTION"]


def virl_env_factory(path: str, *, vision: bool = False, verify_iter: int = VERIFY_ITER, **kwargs: Any):
    """An `environment_factory` over the V-IRL data at `path` (read once, checked now)."""
    data = load_virl_data(path, vision=vision)

    def factory() -> VIRLNavigationEnv:
        return VIRLNavigationEnv(data, verify_iter=verify_iter, **kwargs)

    return factory


# ---------------------------------------------------------------------------------------- datasets

_PROMPT = (
    "You are an expert in navigation. You will receive a sequence of instructions to follow. You are also provided "
    "with your observation and action history{vision}. Your goal is to first analyze the instruction and identify "
    "the next sentence to be executed. Then, you need to provide the action to be taken based on the current "
    "observation and instruction. Act by calling the take_action tool with your current observation, current "
    "instruction and action.\n\n[Instruction]\n{instruction}\n\n[Action space]\n{action_space}\n\n"
    "[Observations and actions sequence]\n"
)


def virl_demonstration(env: VIRLNavigationEnv) -> tuple[list[dict[str, Any]], list[Any]]:
    """The ground-truth episode of a freshly reset environment as a tool-calling conversation (the loop's own
    format): one `take_action` call per rail position with the environment's real replies, then a closing message.
    Returns the messages and, for the vision-language variant, the images of the tool replies in order."""
    messages: list[dict[str, Any]] = []
    images: list[Any] = []
    for step in list(env.rail):
        arguments = {
            "action": step.action,
            "current_observation": step.observation,
            "current_instruction": step.instruction,
        }
        call = {"type": "function", "function": {"name": "take_action", "arguments": arguments}}
        messages.append({"role": "assistant", "content": _text("", env.vision), "tool_calls": [call]})
        reply = env.take_action(**arguments)
        if isinstance(reply, list):
            images.append(reply[0]["image"])
            reply = [{"type": "image"}, {"type": "text", "text": reply[1]["text"]}]
        else:
            reply = _text(reply, env.vision)
        messages.append({"role": "tool", "name": "take_action", "content": reply})
    if not env.success:
        raise VIRLDataError("V-IRL route: its ground-truth actions do not reach the destination.")
    messages.append({"role": "assistant", "content": _text("I reached the destination.", env.vision)})
    return messages, images


def _text(text: str, parts: bool) -> Any:
    """Message content: a string, or (vision-language conversations, where every content is a list) one text part."""
    return [{"type": "text", "text": text}] if parts else text


def _route_rows(
    data: VIRLData,
    indices: Sequence[int],
    *,
    absolute_action: bool,
    vision: bool,
    seed: int,
    resolution: int,
    straight_line_length: int = 2,
    sft: bool = False,
) -> Dataset:
    rows = []
    env = VIRLNavigationEnv(data, resolution=resolution, straight_line_length=straight_line_length)
    for index in indices:
        first = env.reset(route_index=index, absolute_action=absolute_action, vision=vision, seed=seed)
        text = _PROMPT.format(
            vision=" (the current view as an image of 4 views: ahead, right, behind, left)"
            if vision
            else " in text",
            instruction="\n".join(f"{i + 1}. {s}" for i, s in enumerate(env.instructions)),
            action_space=action_space(absolute_action),
        )
        # `reset` appends the first observation to the prompt in the loop; the prompt holds the rest.
        content: Any = [{"type": "image"}, {"type": "text", "text": text}] if vision else text
        row: dict[str, Any] = {
            "prompt": [{"role": "user", "content": content}],
            "route_index": int(index),
            "absolute_action": absolute_action,
            "vision": vision,
            "seed": seed,
            "first_observation": first,
        }
        if vision:
            row["images"] = [env.observation_image()]
        if sft:
            # The demonstration's prompt carries the first observation itself (in the loop, `reset` appends it).
            if vision:
                row["prompt"][0]["content"][1]["text"] += first
            else:
                row["prompt"][0]["content"] += first
            row["completion"], replies = virl_demonstration(env)
            if vision:
                row["images"] += replies
            row = {k: row[k] for k in ("prompt", "completion", *(("images",) if vision else ()))}
        rows.append(row)
    return Dataset.from_list(rows)


def split_route_indices(
    num_routes: int,
    num_train: int,
    num_validation: int,
    num_eval: int,
    *,
    seed: int = 0,
    path: str = "the data",
) -> tuple[list[int], list[int], list[int]]:
    """The route indices of the train, validation and evaluation splits: a seeded shuffle of all routes, cut in
    that order (what `build_virl_datasets` trains and evaluates on; `amft-eval` picks its ID routes the same way).

    Raises:
        VIRLDataError: when the folder has fewer routes than the splits ask for.
    """
    wanted = num_train + num_validation + num_eval
    if min(num_train, num_validation, num_eval) < 0 or wanted > num_routes:
        raise VIRLDataError(
            f"V-IRL data: cannot build the splits: {path} has {num_routes} routes, the splits ask for {wanted} "
            f"({num_train} train + {num_validation} validation + {num_eval} evaluation)."
        )
    order = list(range(num_routes))
    random.Random(f"virl-splits/{seed}").shuffle(order)
    return (
        order[:num_train],
        order[num_train : num_train + num_validation],
        order[num_train + num_validation : wanted],
    )


def virl_prompt_dataset(
    data: VIRLData,
    indices: Sequence[int],
    *,
    absolute_action: bool = True,
    vision: bool = False,
    seed: int = 0,
    resolution: int = 256,
    straight_line_length: int = 2,
) -> Dataset:
    """Prompt rows for the routes `indices` of `data` (the rows of `build_virl_datasets`' RL and evaluation
    splits: `prompt`, `route_index`, `absolute_action`, `vision`, `seed`, `first_observation`, and `images` for the
    vision-language variant)."""
    return _route_rows(
        data,
        indices,
        absolute_action=absolute_action,
        vision=vision,
        seed=seed,
        resolution=resolution,
        straight_line_length=straight_line_length,
    )


@dataclass
class VIRLDatasets:
    """V-IRL datasets (prompt rows carry `route_index`, `absolute_action`, `vision`, `seed` for
    `VIRLNavigationEnv.reset`; `sft` holds `prompt` / `completion`). `eval_ood_rule` is `eval_id`'s routes in the relative action space;
    `eval_ood_visual` is the routes of `ood_path` (another city), None when no `ood_path` was given."""

    rl: Dataset
    sft: Dataset
    validation: Dataset
    eval_id: Dataset
    eval_ood_rule: Dataset
    eval_ood_visual: Dataset | None


def build_virl_datasets(
    path: str,
    num_train: int,
    num_validation: int,
    num_eval: int,
    *,
    ood_path: str | None = None,
    vision: bool = False,
    seed: int = 0,
    resolution: int = 256,
    straight_line_length: int = 2,
) -> VIRLDatasets:
    """Split the routes at `path` (seeded shuffle) into RL (with SFT demonstrations on the same routes: the
    ground-truth episodes as tool-calling conversations), validation and ID evaluation routes, and build the
    reference's OOD splits: the rule OOD (the same evaluation routes, relative actions) and, from `ood_path`, the
    visual OOD (another city's routes, absolute actions). `straight_line_length` is the number of `forward()`
    points between intersections in the demonstrations (pass the same value to `virl_env_factory`).

    Raises:
        VIRLDataError: for a missing or incomplete data folder, or a split that cannot be built (one line saying
            which and why).
    """
    data = load_virl_data(path, vision=vision)
    train, validation, test = split_route_indices(
        len(data.routes), num_train, num_validation, num_eval, seed=seed, path=path
    )
    kw = {
        "vision": vision,
        "seed": seed,
        "resolution": resolution,
        "straight_line_length": straight_line_length,
    }
    ood_visual = None
    if ood_path is not None:
        ood = load_virl_data(ood_path, vision=vision)
        if len(ood.routes) < num_eval:
            raise VIRLDataError(
                f"V-IRL data: cannot build the visual OOD split: {ood_path} has {len(ood.routes)} routes, "
                f"{num_eval} asked."
            )
        ood_visual = _route_rows(ood, range(num_eval), absolute_action=True, **kw)
    return VIRLDatasets(
        rl=_route_rows(data, train, absolute_action=True, **kw),
        sft=_route_rows(data, train, absolute_action=True, sft=True, **kw),
        validation=_route_rows(data, validation, absolute_action=True, **kw),
        eval_id=_route_rows(data, test, absolute_action=True, **kw),
        eval_ood_rule=_route_rows(data, test, absolute_action=False, **kw),
        eval_ood_visual=ood_visual,
    )
