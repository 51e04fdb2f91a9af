from __future__ import annotations

import os
import subprocess
import sys

import msgspec
import pytest

from shop.settings import DEV_JWT_KEYS, Settings, SettingsError, load_settings

STRONG_KEYS = "k1:" + "s" * 40


@pytest.mark.parametrize(
    ("environ", "variable", "says"),
    [
        ({"SHOP_TIMEZONE": "Mars/Base"}, "SHOP_TIMEZONE", "Mars/Base"),
        ({"SHOP_ENV": "staging"}, "SHOP_ENV", "staging"),
        ({"SHOP_DB_POOL_MAX": "abc"}, "SHOP_DB_POOL_MAX", "Expected `int`"),
        ({"SHOP_DB_POOL_MIN": "0"}, "SHOP_DB_POOL_MIN", ">= 1"),
        ({"SHOP_DB_POOL_MIN": "30", "SHOP_DB_POOL_MAX": "10"}, "SHOP_DB_POOL_MIN", "SHOP_DB_POOL_MAX"),
        ({"SHOP_LOG_REQUESTS": "maybe"}, "SHOP_LOG_REQUESTS", "bool"),
        ({"SHOP_REDIS_PREFIX": "has space"}, "SHOP_REDIS_PREFIX", "regex"),
        ({"SHOP_JWT_KEYS": "no-colon-here"}, "SHOP_JWT_KEYS", "kid:secret"),
        ({"SHOP_JWT_KEYS": "k1:short"}, "SHOP_JWT_KEYS", "16+"),
        ({"SHOP_JWT_KEYS": " , "}, "SHOP_JWT_KEYS", "at least one key"),
        ({"SHOP_PAYMENT_PROVIDER": "wechatpay"}, "SHOP_PAYMENT_PROVIDER", "SHOP_WECHATPAY_MCHID"),
        (
            {
                "SHOP_ENV": "production",
                "SHOP_PAYMENT_PROVIDER": "wechatpay",
                "SHOP_WECHATPAY_MCHID": "1900000001",
            },
            "SHOP_JWT_KEYS",
            "public dev key",
        ),
        (
            {
                "SHOP_ENV": "production",
                "SHOP_PAYMENT_PROVIDER": "wechatpay",
                "SHOP_WECHATPAY_MCHID": "1900000001",
                "SHOP_JWT_KEYS": "k1:only-twenty-chars-x",
            },
            "SHOP_JWT_KEYS",
            "32 characters",
        ),
    ],
)
def test_bad_value_names_the_variable(environ, variable, says):
    with pytest.raises(SettingsError) as info:
        load_settings(environ)
    message = str(info.value)
    assert message.startswith(variable), message
    assert says in message


def test_defaults_when_nothing_is_set():
    settings = load_settings({})
    assert settings == Settings()
    assert settings.env == "development"
    assert settings.timezone == "Asia/Shanghai"
    assert settings.jwt_keys == DEV_JWT_KEYS
    assert settings.data_dir == ".data"


def test_values_from_strings_are_converted():
    settings = load_settings(
        {
            "SHOP_DB_POOL_MIN": "3",
            "SHOP_DB_POOL_MAX": "7",
            "SHOP_LOG_REQUESTS": "false",
            "SHOP_ACCESS_TOKEN_TTL": "600",
            "SHOP_TIMEZONE": "Europe/Berlin",
            "SHOP_JWT_KEYS": "new:" + "n" * 20 + ",old:" + "o" * 20,
            "SHOP_LOG_LEVEL": "DEBUG",
            "SHOP_NOT_A_SETTING": "ignored",
            "PATH": "/usr/bin",
        }
    )
    assert (settings.db_pool_min, settings.db_pool_max, settings.access_token_ttl) == (3, 7, 600)
    assert settings.log_requests is False
    assert settings.tz.key == "Europe/Berlin"
    assert settings.signing_kid == "new"
    assert set(settings.jwt_key_map) == {"new", "old"}


def test_production_accepts_strong_keys():
    settings = load_settings(
        {
            "SHOP_ENV": "production",
            "SHOP_PAYMENT_PROVIDER": "wechatpay",
            "SHOP_WECHATPAY_MCHID": "1900000001",
            "SHOP_JWT_KEYS": STRONG_KEYS,
        }
    )
    assert settings.env == "production"


def test_overrides_win_over_environment():
    settings = load_settings({"SHOP_DB_POOL_MAX": "9"}, db_pool_max=11)
    assert settings.db_pool_max == 11


def test_settings_are_frozen():
    settings = load_settings({})
    with pytest.raises(AttributeError):
        settings.db_pool_max = 5  # type: ignore[misc]
    assert msgspec.structs.replace(settings, db_pool_max=5).db_pool_max == 5


def _shop(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SHOP_")}
    return subprocess.run(
        [sys.executable, "-m", "shop.cli", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_with_a_bad_setting_exits_with_a_clear_message():
    result = _shop("serve", "--port", "1", SHOP_DB_POOL_MAX="abc")
    assert result.returncode != 0
    assert "configuration error: SHOP_DB_POOL_MAX: Expected `int`, got `str`" in result.stderr
    assert "Traceback" not in result.stderr


def test_migrate_with_a_bad_time_zone_exits_with_a_clear_message():
    result = _shop("migrate", SHOP_TIMEZONE="Mars/Base")
    assert result.returncode != 0
    assert "configuration error: SHOP_TIMEZONE: unknown time zone 'Mars/Base'" in result.stderr
    assert "Traceback" not in result.stderr


def test_production_refuses_test_only_fault_injection():
    with pytest.raises(SettingsError, match="SHOP_FLASH_FAULT_PAUSE_SECONDS"):
        load_settings(
            {
                "SHOP_ENV": "production",
                "SHOP_PAYMENT_PROVIDER": "wechatpay",
                "SHOP_WECHATPAY_MCHID": "1900000001",
                "SHOP_JWT_KEYS": STRONG_KEYS,
                "SHOP_FLASH_FAULT_PAUSE_SECONDS": "5",
            }
        )
