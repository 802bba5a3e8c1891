"""The maintainers' review of submitted adapter versions: the evaluation queue and decisions.

`GET /api/evaluations?state=` lists evaluations, newest first, single-blind (a pseudonym until the
version is decided). `POST /api/evaluations/{ref}/decision {decision, reason}` lets a maintainer
accept or reject a version by hand — overriding the gate, or settling a failed evaluation — and is
audited. `ref` is the revision's 40-hex commit id or the evaluation's numeric id.
"""

import re

from fastapi import APIRouter
from sqlalchemy import select

from fedem.hub.auth import Maintainer, SessionDep
from fedem.hub.errors import HubError
from fedem.hub.leases import audit
from fedem.hub.models import EVALUATION_STATES, Evaluation, Revision, utcnow
from fedem.hub.schemas import DecisionCreate, EvaluationPublic, evaluation_public

router = APIRouter(tags=["evaluations"])


def _public(session: SessionDep, evaluation: Evaluation) -> EvaluationPublic:
    base_id = evaluation.revision.base_id
    return evaluation_public(evaluation, session.get(Revision, base_id) if base_id else None)


def find_evaluation(session: SessionDep, ref: str) -> Evaluation:
    """By the revision's commit id, or by the evaluation's id."""
    found: Evaluation | None = None
    if re.fullmatch(r"[0-9a-f]{40}", ref):
        found = session.scalar(
            select(Evaluation)
            .join(Revision, Evaluation.revision_id == Revision.id)
            .where(Revision.commit == ref)
        )
    elif ref.isdigit():
        found = session.get(Evaluation, int(ref))
    if found is None:
        raise HubError(
            404, "evaluation_not_found", f"no evaluation for {ref!r} (a commit id or an evaluation id)"
        )
    return found


@router.get("/api/evaluations", response_model=list[EvaluationPublic])
def list_evaluations(
    session: SessionDep, _user: Maintainer, state: str | None = None, limit: int = 200
) -> list[EvaluationPublic]:
    """Evaluations, newest first, optionally of one state (maintainers)."""
    query = select(Evaluation).order_by(Evaluation.id.desc()).limit(max(1, min(limit, 5000)))
    if state is not None:
        if state not in EVALUATION_STATES:
            raise HubError(422, "bad_state", f"state is one of {', '.join(EVALUATION_STATES)}, not {state!r}")
        query = query.where(Evaluation.state == state)
    return [_public(session, evaluation) for evaluation in session.scalars(query).all()]


@router.get("/api/evaluations/{ref}", response_model=EvaluationPublic)
def show_evaluation(ref: str, session: SessionDep, _user: Maintainer) -> EvaluationPublic:
    return _public(session, find_evaluation(session, ref))


@router.post("/api/evaluations/{ref}/decision", response_model=EvaluationPublic)
def decide_by_hand(ref: str, body: DecisionCreate, session: SessionDep, user: Maintainer) -> EvaluationPublic:
    """Accept or reject a version by hand (maintainers); the evaluation is done and the override audited.

    A worker still scoring this version discards its result when it finishes."""
    evaluation = find_evaluation(session, ref)
    revision = evaluation.revision
    before = {"state": evaluation.state, "decision": evaluation.decision}
    evaluation.state = "done"
    evaluation.decision = body.decision
    evaluation.reason = f"maintainer {user.name}: {body.reason}"
    evaluation.finished_at = utcnow()
    revision.status = body.decision
    audit(
        session,
        user,
        "evaluation_override",
        revision.repo.name,
        tag=revision.tag,
        commit=revision.commit,
        decision=body.decision,
        reason=body.reason,
        before=before,
    )
    session.commit()
    return _public(session, evaluation)
