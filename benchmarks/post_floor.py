"""What any POST costs through Serve's proxy before a line of work: benchmarks/recs_floor.py's
`post_floor` arm.

A replica that validates a recommendation request's body and answers at once. Unlike `GET
/healthz`, a request with a body makes the replica fetch it from the proxy (a second call between
the two processes), so this, not `/healthz`, is the floor of `POST /v1/recommendations`.
"""

from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from deployments.recommender_http import PrefixIsTheRoute
from deployments.schemas import RecommendationRequest

api = FastAPI()
api.add_middleware(PrefixIsTheRoute)  # as on the app's route: `/.../v1/recommendations` is "/"


@serve.deployment(name="PostFloor", ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class PostFloor:
    @api.post("/")
    async def answer(self, body: RecommendationRequest) -> dict[str, Any]:
        return {"user_id": body.user_id, "items": []}


def post_floor_app() -> Application:
    return PostFloor.bind()
