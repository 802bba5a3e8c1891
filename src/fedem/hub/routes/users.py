"""Contributors: maintainers add them over the API (`fedem hub user add` works on the database)."""

from fastapi import APIRouter

from fedem.hub.auth import CurrentUser, Maintainer, SessionDep, create_user
from fedem.hub.leases import audit
from fedem.hub.schemas import UserCreate, UserCreated

router = APIRouter(tags=["users"])


@router.post("/api/users", status_code=201, response_model=UserCreated)
def add_user(body: UserCreate, session: SessionDep, admin: Maintainer) -> UserCreated:
    user, token = create_user(session, body.name, body.role)
    audit(session, admin, "add_user", None, name=body.name, role=body.role)
    session.commit()
    return UserCreated(name=user.name, role=user.role, pseudonym=user.pseudonym, token=token)


@router.get("/api/whoami")
def whoami(user: CurrentUser) -> dict[str, str]:
    return {"name": user.name, "role": user.role, "pseudonym": user.pseudonym}
