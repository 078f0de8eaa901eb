"""V-IRL data in the reference's layout (`route_infos.json`, street views and their GPS mapping), written for
tests: a few short routes near (40.7, -74.0), each with a start, two intersections and its destination."""

from __future__ import annotations

import json
import os
import pickle

# Three routes in a small grid near (40.7, -74.0): start, two intersections, the destination.
D = 0.0003  # about 33 m of latitude


def route(i: int) -> dict:
    lat, lng = 40.7 + i * 0.01, -74.0
    geocodes = [[lat + D, lng], [lat + D, lng + D], [lat + 2 * D, lng + D]]
    blocks = [
        (f"Cafe {i} is on your left", "0 (north)"),
        ("No landmark nearby", "90 (east)"),
        (f"Museum {i} is on your right", "0 (north)"),
    ]
    milestones = "\n".join(
        f'{{\n  "landmarks": "{lm}",\n  "to_next_intersection_heading": "{hd}",\n}}' for lm, hd in blocks
    )
    return {
        "start_place": {"name": "start", "relocated_geocode": [lat, lng]},
        "dest_place": {"name": f"Museum {i}", "geocode": geocodes[-1]},
        "route_results": {"geocode_list": geocodes, "landmark_list": [None, None]},
        "milestone_info": milestones,
        "init_heading": 180,
    }


def write_fixture(path, n_routes: int = 3, vision: bool = True) -> str:
    from PIL import Image

    os.makedirs(path, exist_ok=True)
    routes = [route(i) for i in range(n_routes)]
    with open(os.path.join(path, "route_infos.json"), "w") as f:
        json.dump([routes, n_routes], f)
    if vision:
        views = os.path.join(path, "street_views")
        os.makedirs(views, exist_ok=True)
        mapping = {}
        for r in routes:
            points = [r["start_place"]["relocated_geocode"], *r["route_results"]["geocode_list"]]
            # panoramas every ~11 m along each leg
            for a, b in zip(points, points[1:]):
                for t in (0.0, 0.33, 0.66):
                    g = (a[0] * (1 - t) + b[0] * t, a[1] * (1 - t) + b[1] * t)
                    pano = f"p{len(mapping)}"
                    mapping[g] = pano
                    image = Image.new("RGB", (64, 32))
                    image.putdata([(x * 4, y * 8, len(mapping) % 256) for y in range(32) for x in range(64)])
                    image.save(os.path.join(views, f"{pano}.jpg"))
                    with open(os.path.join(views, f"{pano}.metadata.json"), "w") as f:
                        json.dump({"rotation": 10.0}, f)
            mapping[tuple(points[-1])] = "p0"
        with open(os.path.join(path, "gps_pano_mapping.pkl"), "wb") as f:
            pickle.dump(mapping, f)
    return str(path)
