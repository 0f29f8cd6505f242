"""The certificate issuer's trust rules, without the cluster: ID-token verification,
identity mapping keyed on (identity provider, claim), system accounts, and the
configurations that must not run (tests/test_issuer.py runs the issuer end to end)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from xsedehub.auth.issuer_client import issuer_url_problems

from xsedehub import issuer_service as isv

IDP_A, IDP_B = "https://idp.a.edu/idp", "https://idp.b.edu/idp"
OIDC = "https://cilogon.example.org"
ANY = ".".join(["0"] * 4)  # every interface


def cfg(**kw) -> isv.IssuerConfig:
    base = dict(
        ca_key="/nonexistent",
        oidc_issuer=OIDC,
        client_id="cilogon:/client_id/hub",
        hub_secret="s" * 64,
        allowed_idps=[IDP_A, IDP_B],
        strip_domain=(IDP_A, "a.edu"),
    )
    return isv.IssuerConfig(**{**base, **kw})


KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUBLIC = jwt.PyJWK.from_dict(
    {**jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key(), as_dict=True), "kid": "k1"}
)


def id_token(**claims) -> str:
    now = int(time.time())
    base = {
        "iss": OIDC,
        "aud": "cilogon:/client_id/hub",
        "sub": "http://cilogon.org/serverA/users/1",
        "iat": now,
        "exp": now + 900,
        "idp": IDP_A,
        "eppn": "alice@a.edu",
    }
    base.update(claims)
    return jwt.encode({k: v for k, v in base.items() if v is not None}, KEY, "RS256")


def test_a_valid_id_token_verifies():
    claims = isv.verify_id_token(cfg(), id_token(), PUBLIC)
    assert claims["eppn"] == "alice@a.edu"


@pytest.mark.parametrize(
    "claims,error",
    [
        ({"aud": "another-gateway"}, "wrong_audience"),
        ({"aud": ["cilogon:/client_id/hub", "another-gateway"]}, "wrong_audience"),
        ({"aud": ["cilogon:/client_id/hub", "x"], "azp": "x"}, "wrong_audience"),
        ({"iss": "https://evil.example"}, "wrong_issuer"),
        ({"exp": int(time.time()) - 120}, "id_token_expired"),
        ({"exp": None}, "invalid_id_token"),
        ({"sub": None}, "invalid_id_token"),
    ],
)
def test_id_tokens_that_prove_no_login_at_this_hub_are_refused(claims, error):
    with pytest.raises(isv.Refusal) as e:
        isv.verify_id_token(cfg(), id_token(**claims), PUBLIC)
    assert e.value.error == error


def test_several_audiences_need_azp_of_this_hub():
    tok = id_token(aud=["cilogon:/client_id/hub", "x"], azp="cilogon:/client_id/hub")
    assert isv.verify_id_token(cfg(), tok, PUBLIC)["sub"]


def test_a_token_signed_by_another_key_or_unsigned_is_refused():
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = jwt.decode(id_token(), options={"verify_signature": False})
    for forged in (jwt.encode(claims, other, "RS256"), jwt.encode(claims, None, "none")):
        with pytest.raises(isv.Refusal) as e:
            isv.verify_id_token(cfg(), forged, PUBLIC)
        assert e.value.error == "invalid_id_token"


@pytest.mark.parametrize(
    "idp,eppn,result",
    [
        (IDP_A, "alice@a.edu", "alice"),
        (IDP_A, "Alice@A.EDU", "alice"),
        # the same local part at another IdP is not alice (no mapping: refused)
        (IDP_B, "alice@b.edu", "unmapped_identity"),
        # another IdP asserting a name in the stripped domain is not that person
        (IDP_B, "alice@a.edu", "unmapped_identity"),
        (IDP_A, "alice@b.edu", "unmapped_identity"),
        ("https://evil.example", "alice@a.edu", "idp_not_allowed"),
        (None, "alice@a.edu", "idp_not_allowed"),
        (IDP_A, "root@a.edu", "system_account"),
        (IDP_A, "slurm@a.edu", "system_account"),
        (IDP_A, "x;id@a.edu", "unmapped_identity"),
    ],
)
def test_identities_are_keyed_on_idp_and_claim(idp, eppn, result):
    c = cfg(mapping={(IDP_B, "carol@b.edu"): "carol"})
    claims = {"idp": idp, "eppn": eppn}
    if result.islower() and "_" not in result:
        assert isv.map_identity(c, claims) == result
    else:
        with pytest.raises(isv.Refusal) as e:
            isv.map_identity(c, claims)
        assert e.value.error == result, e.value.message


def test_mapping_is_per_idp():
    c = cfg(mapping={(IDP_B, "carol@b.edu"): "carol"})
    assert isv.map_identity(c, {"idp": IDP_B, "eppn": "carol@b.edu"}) == "carol"
    with pytest.raises(isv.Refusal):
        isv.map_identity(c, {"idp": IDP_A, "eppn": "carol@b.edu"})


def test_system_accounts_by_uid_and_deny_list():
    # daemon (uid 1) is on the default list; nobody's uid is 65534 but it is denied by name
    for name in ("daemon", "nobody"):
        with pytest.raises(isv.Refusal) as e:
            isv.map_identity(cfg(), {"idp": IDP_A, "eppn": f"{name}@a.edu"})
        assert e.value.error == "system_account"
    # any local account below min_uid, whatever its name (here: the deny list is empty)
    with pytest.raises(isv.Refusal) as e:
        isv.map_identity(cfg(deny_accounts=[]), {"idp": IDP_A, "eppn": "root@a.edu"})
    assert (e.value.error, "uid 0 < 1000" in e.value.message) == ("system_account", True)
    with pytest.raises(isv.Refusal) as e:
        isv.map_identity(cfg(deny_accounts=["alice"]), {"idp": IDP_A, "eppn": "alice@a.edu"})
    assert e.value.error == "system_account"


@pytest.mark.parametrize(
    "change,says",
    [
        ({"allowed_idps": []}, "at least one identity provider"),
        ({"client_id": ""}, "client id"),
        ({"hub_secret": "short"}, "at least 32"),
        ({"oidc_issuer": "http://cilogon.example.org"}, "use https"),
        ({"jwks_url": "http://cilogon.example.org/jwks"}, "use https"),
        ({"strip_domain": ("https://other/idp", "a.edu")}, "not an --allowed-idp"),
        ({"mapping": {("https://other/idp", "x"): "x"}}, "not an --allowed-idp"),
    ],
)
def test_configurations_the_issuer_refuses(change, says):
    with pytest.raises(isv.ConfigProblem) as e:
        cfg(**change).check()
    assert says in str(e.value)
    cfg(oidc_issuer="http://127.0.0.1:9400").check()  # a loopback provider may be http


def test_old_flat_mapping_file_is_refused(tmp_path):
    p = tmp_path / "map.json"
    p.write_text('{"alice@a.edu": "alice"}')
    with pytest.raises(isv.ConfigProblem, match="identity provider"):
        isv.load_mapping(str(p))
    p.write_text(json.dumps({IDP_B: {"alice@b.edu": "alice2"}}))
    assert isv.load_mapping(str(p)) == {(IDP_B, "alice@b.edu"): "alice2"}


def test_secret_file_must_be_private_and_long(tmp_path):
    p = tmp_path / "secret"
    p.write_text("ab" * 32 + "\n")
    p.chmod(0o644)
    with pytest.raises(isv.ConfigProblem, match="readable by others"):
        isv.read_secret_file(str(p))
    p.chmod(0o600)
    assert isv.read_secret_file(str(p)) == "ab" * 32
    p.write_text("short\n")
    with pytest.raises(isv.ConfigProblem, match="at least 32"):
        isv.read_secret_file(str(p))


@pytest.mark.parametrize(
    "host,certfile,refused",
    [
        ("127.0.0.1", None, False),
        ("::1", None, False),
        ("localhost", None, False),
        (ANY, None, True),
        ("10.0.0.5", None, True),
        ("issuer.example.org", None, True),
        (ANY, "/etc/issuer/cert.pem", False),
    ],
)
def test_listen_off_loopback_needs_tls(host, certfile, refused):
    assert (isv.listen_problem(host, certfile) is not None) == refused


def test_the_command_refuses_to_listen_off_loopback_without_tls(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "xsedehub.cli", "issuer", "--ca-key", str(tmp_path / "ca"),
         "--oidc-issuer", OIDC, "--client-id", "hub", "--hub-secret-file",
         str(tmp_path / "secret"), "--allowed-idp", IDP_A, "--listen", "0.0.0.0:8700"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "without TLS" in r.stderr


def test_the_command_needs_an_allowed_idp(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "xsedehub.cli", "issuer", "--ca-key", str(tmp_path / "ca"),
         "--oidc-issuer", OIDC, "--client-id", "hub", "--hub-secret-file",
         str(tmp_path / "secret")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 2 and "--allowed-idp" in r.stderr, r.stderr


@pytest.mark.parametrize(
    "url,verify,ok",
    [
        ("https://issuer.example.org/v1/certificate", True, True),
        ("https://issuer.example.org/v1/certificate", "/etc/ssl/certs", True),
        # requests reads "" as "no verification", and a bundle that is not there is an error
        ("https://issuer.example.org/v1/certificate", "", False),
        ("https://issuer.example.org/v1/certificate", 0, False),
        ("https://issuer.example.org/v1/certificate", "/no/such/ca.pem", False),
        ("http://issuer.example.org/v1/certificate", True, False),
        ("https://issuer.example.org/v1/certificate", False, False),
        ("http://127.0.0.1:8700/v1/certificate", True, True),
        ("https://127.0.0.1:8700/v1/certificate", False, True),
        ("http://[::1]:8700/v1/certificate", False, True),
        # a name that merely starts like loopback is not loopback
        ("http://127.0.0.1.evil.example/v1/certificate", True, False),
        ("ftp://issuer.example.org/", True, False),
    ],
)
def test_hub_side_issuer_url_rules(url, verify, ok):
    assert (issuer_url_problems(url, verify) == []) == ok


async def test_the_hub_sends_nothing_without_an_id_token():
    from xsedehub.auth.cilogon import XSEDECILogonAuthenticator
    from xsedehub.auth.issuer_client import IssuerRefused

    a = XSEDECILogonAuthenticator(issuer_url="http://127.0.0.1:9/v1/certificate")
    with pytest.raises(IssuerRefused, match="no ID token"):
        await a._issue(a._id_token({"access_token": "a", "token_response": {}}))
