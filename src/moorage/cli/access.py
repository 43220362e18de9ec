"""The access commands: `moorage user|team|perm|repo ...`, clients of the admin API.

Every command takes --existing URL, the admin's credentials (as the cluster
commands do) and --json. New passwords come from --password-file FILE ("-"
reads stdin); trailing line breaks are not part of the password. They are
never taken from the command line, where `ps` would show them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from moorage.cli.adminclient import AdminClient, add_cluster_options
from moorage.cli.errors import CliError
from moorage.cli.tables import print_table
from moorage.registry.users import AccessError, check_principal

def register(commands) -> None:
    _user(commands)
    _team(commands)
    _perm(commands)
    _repo(commands)


def _command(group, name: str, help: str, run) -> argparse.ArgumentParser:
    p = group.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
    add_cluster_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)
    return p


def _subject_options(p: argparse.ArgumentParser, required: bool) -> None:
    who = p.add_mutually_exclusive_group(required=required)
    who.add_argument("--user", metavar="NAME", help="a user")
    who.add_argument("--team", metavar="NAME", help="a team")


def _user(commands) -> None:
    group = commands.add_parser("user", help="users and their passwords (add, list, remove, passwd)",
                                description="Manage the registry's users.").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    p = _command(group, "add", "create a user", run_user_add)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--password-file", metavar="FILE", required=True,
                   help="file holding the new user's password ('-': stdin)")
    p.add_argument("--admin", action="store_true", help="make the user a cluster admin")
    _command(group, "list", "list users, whether they are cluster admins, and their teams", run_user_list)
    p = _command(group, "remove", "remove a user with its grants and team memberships", run_user_remove)
    p.add_argument("name", metavar="NAME")
    p = _command(group, "passwd", "set a user's password", run_user_passwd)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--password-file", metavar="FILE", required=True,
                   help="file holding the new password ('-': stdin)")


def _team(commands) -> None:
    group = commands.add_parser("team", help="teams and their members (create, delete, list, add-member, "
                                             "remove-member)",
                                description="Manage teams: users in a team get the team's grants."
                                ).add_subparsers(dest="action", metavar="ACTION", required=True)
    p = _command(group, "create", "create a team", run_team_create)
    p.add_argument("name", metavar="NAME")
    p = _command(group, "delete", "delete a team with its grants and memberships", run_team_delete)
    p.add_argument("name", metavar="NAME")
    _command(group, "list", "list teams and their members", run_team_list)
    p = _command(group, "add-member", "add a user to a team", run_team_member)
    p.add_argument("team", metavar="TEAM")
    p.add_argument("user", metavar="USER")
    p = _command(group, "remove-member", "remove a user from a team", run_team_member)
    p.add_argument("team", metavar="TEAM")
    p.add_argument("user", metavar="USER")


def _perm(commands) -> None:
    group = commands.add_parser("perm", help="roles of users and teams on repositories (grant, revoke, list, "
                                             "check)",
                                description="Grant roles on a repository, NAMESPACE/* (everything under it) "
                                            "or * (everything): read (pull), write (pull, push), admin (pull, "
                                            "push, delete).").add_subparsers(dest="action", metavar="ACTION",
                                                                              required=True)
    p = _command(group, "grant", "give a user or team a role on repositories", run_perm_grant)
    _subject_options(p, required=True)
    p.add_argument("--repo", required=True, metavar="NAME_OR_NAMESPACE/*", help="a repository, NAMESPACE/* or *")
    p.add_argument("--role", required=True, metavar="read|write|admin",
                   help="read (pull), write (pull, push) or admin (pull, push, delete)")
    p = _command(group, "revoke", "take a user's or team's grant on repositories away", run_perm_revoke)
    _subject_options(p, required=True)
    p.add_argument("--repo", required=True, metavar="NAME_OR_NAMESPACE/*", help="the pattern of the grant")
    p = _command(group, "list", "list grants", run_perm_list)
    _subject_options(p, required=False)
    p.add_argument("--repo", metavar="NAME_OR_NAMESPACE/*",
                   help="only grants that cover this repository (or, for a pattern, grants on exactly it)")
    p = _command(group, "check", "show what a user (or anonymous) may do to a repository", run_perm_check)
    p.add_argument("--user", metavar="NAME", help="the user (default: anonymous)")
    p.add_argument("--repo", required=True, metavar="NAME", help="a repository name")


def _repo(commands) -> None:
    group = commands.add_parser("repo", help="repository visibility (visibility, list-visibility)",
                                description="Public repositories can be pulled by anyone, even anonymously."
                                ).add_subparsers(dest="action", metavar="ACTION", required=True)
    p = _command(group, "visibility", "make repositories public or private", run_repo_visibility)
    p.add_argument("repo", metavar="NAME_OR_NAMESPACE/*", help="a repository, NAMESPACE/* or *")
    p.add_argument("visibility", metavar="public|private|inherit",
                   help="inherit forgets the setting: the next broader pattern decides (default private)")
    _command(group, "list-visibility", "list the visibility settings", run_repo_list_visibility)


# -- helpers ---------------------------------------------------------------------------


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    admin = AdminClient(args)
    try:
        return admin.call(method, path, body)
    finally:
        admin.close()


def _name(value: str, what: str = "user") -> str:
    """A user or team name checked here, before it becomes part of a URL."""
    try:
        return quote(check_principal(value, what), safe="")
    except AccessError as e:
        raise CliError(e.message) from None


def _password(args: argparse.Namespace) -> str:
    if args.password_file == "-":
        if args.password_stdin:
            raise CliError("--password-file - and --password-stdin cannot both read stdin; put the new "
                           "password in a file")
        text = sys.stdin.read()
    else:
        try:
            text = Path(args.password_file).read_text()
        except OSError as e:
            raise CliError(f"cannot read --password-file {args.password_file}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise CliError(f"--password-file {args.password_file} is not UTF-8 text") from None
    password = text.rstrip("\r\n")
    if not password:
        raise CliError(f"--password-file {args.password_file} holds no password")
    return password


def _done(args: argparse.Namespace, result: Any, sentence: str) -> int:
    print(json.dumps(result) if args.json else sentence)
    return 0


def _date(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


# -- user ----------------------------------------------------------------------------------


def run_user_add(args: argparse.Namespace) -> int:
    name, password = _name(args.name), _password(args)
    result = _call(args, "PUT", f"/_admin/users/{name}", {"password": password, "admin": args.admin})
    return _done(args, result, f"created the user {args.name}" + (" (cluster admin)" if args.admin else ""))


def run_user_list(args: argparse.Namespace) -> int:
    result = _call(args, "GET", "/_admin/users")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print_table(["USER", "ADMIN", "TEAMS", "CREATED"],
                [[u["name"], "yes" if u["admin"] else "no", ",".join(u["teams"]) or "-", _date(u["created"])]
                 for u in result["users"]])
    return 0


def run_user_remove(args: argparse.Namespace) -> int:
    result = _call(args, "DELETE", f"/_admin/users/{_name(args.name)}")
    return _done(args, result, f"removed the user {args.name} with its grants and team memberships")


def run_user_passwd(args: argparse.Namespace) -> int:
    name, password = _name(args.name), _password(args)
    result = _call(args, "PUT", f"/_admin/users/{name}/password", {"password": password})
    return _done(args, result, f"changed the password of {args.name}")


# -- team ------------------------------------------------------------------------------------


def run_team_create(args: argparse.Namespace) -> int:
    result = _call(args, "PUT", f"/_admin/teams/{_name(args.name, 'team')}")
    return _done(args, result, f"created the team {args.name}")


def run_team_delete(args: argparse.Namespace) -> int:
    result = _call(args, "DELETE", f"/_admin/teams/{_name(args.name, 'team')}")
    return _done(args, result, f"deleted the team {args.name} with its grants and memberships")


def run_team_list(args: argparse.Namespace) -> int:
    result = _call(args, "GET", "/_admin/teams")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print_table(["TEAM", "MEMBERS", "CREATED"],
                [[t["name"], ",".join(t["members"]) or "-", _date(t["created"])] for t in result["teams"]])
    return 0


def run_team_member(args: argparse.Namespace) -> int:
    adding = args.action == "add-member"
    path = f"/_admin/teams/{_name(args.team, 'team')}/members/{_name(args.user)}"
    result = _call(args, "PUT" if adding else "DELETE", path)
    sentence = f"added {args.user} to the team {args.team}" if adding else \
        f"removed {args.user} from the team {args.team}"
    return _done(args, result, sentence)


# -- perm ------------------------------------------------------------------------------------


def _subject(args: argparse.Namespace) -> dict[str, str]:
    return {"user": args.user} if args.user is not None else {"team": args.team}


def _who(args: argparse.Namespace) -> str:
    return f"the user {args.user}" if args.user is not None else f"the team {args.team}"


def run_perm_grant(args: argparse.Namespace) -> int:
    result = _call(args, "PUT", "/_admin/grants", {**_subject(args), "repo": args.repo, "role": args.role})
    return _done(args, result, f"granted {args.role} on {args.repo} to {_who(args)}")


def run_perm_revoke(args: argparse.Namespace) -> int:
    result = _call(args, "DELETE", "/_admin/grants", {**_subject(args), "repo": args.repo})
    return _done(args, result, f"revoked the grant on {args.repo} of {_who(args)}")


def run_perm_list(args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("user", args.user), ("team", args.team), ("repo", args.repo)) if v is not None}
    result = _call(args, "GET", "/_admin/grants" + (f"?{urlencode(query)}" if query else ""))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print_table(["USER", "TEAM", "REPO", "ROLE"],
                [[g.get("user", "-"), g.get("team", "-"), g["repo"], g["role"]] for g in result["grants"]])
    return 0


def run_perm_check(args: argparse.Namespace) -> int:
    query = {"repo": args.repo, **({"user": args.user} if args.user else {})}
    result = _call(args, "GET", f"/_admin/access?{urlencode(query)}")
    who = args.user or "anonymous"
    actions = ", ".join(result["actions"]) or "nothing"
    visibility = "public" if result["public"] else "private"
    return _done(args, result, f"{who} may {'do ' if not result['actions'] else ''}{actions} on {args.repo} "
                               f"({visibility})")


# -- repo ------------------------------------------------------------------------------------


def run_repo_visibility(args: argparse.Namespace) -> int:
    result = _call(args, "PUT", "/_admin/visibility", {"repo": args.repo, "visibility": args.visibility})
    sentence = f"{args.repo} is now {args.visibility}" if args.visibility != "inherit" else \
        f"{args.repo} now inherits its visibility from the broader patterns"
    return _done(args, result, sentence)


def run_repo_list_visibility(args: argparse.Namespace) -> int:
    result = _call(args, "GET", "/_admin/visibility")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print_table(["REPO", "VISIBILITY"], [[v["repo"], v["visibility"]] for v in result["visibility"]])
    return 0
