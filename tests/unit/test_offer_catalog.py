"""The offer catalog: the shipped files load and hold sensible rows; bad files say where."""

from __future__ import annotations

from collections import Counter
from importlib.resources import files
from pathlib import Path

import pytest

from treadle.domain.resources import Tier
from treadle.weaver.providers.catalog import (
    CATALOG_COLUMNS,
    CLOUD_RUNTIMES,
    CatalogError,
    default_catalog_paths,
    gpu_type,
    load_catalog,
)

HEADER = ",".join(CATALOG_COLUMNS)


def write(tmp_path: Path, name: str, *rows: str, header: str = HEADER) -> Path:
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


# the shipped catalog


def test_shipped_catalog_loads_every_provider() -> None:
    offers = load_catalog()
    counts = Counter(offer.provider for offer in offers)
    files = {entry.name.removesuffix(".csv") for entry in default_catalog_paths()}
    assert set(counts) == files
    assert len(files) >= 5
    assert all(count >= 5 for count in counts.values()), counts
    assert len({offer.name for offer in offers}) == len(offers)


def test_shipped_rows_are_sensible() -> None:
    for offer in load_catalog():
        assert offer.price_per_hour > 0, offer.name
        if offer.spot_price_per_hour is not None:
            assert 0 < offer.spot_price_per_hour <= offer.price_per_hour, offer.name
        if offer.gpu_count:
            assert offer.gpu_type, offer.name
            assert offer.gpu_type == offer.gpu_type.lower() and " " not in offer.gpu_type
        else:
            assert offer.gpu_type is None, offer.name
        assert offer.cpu_millicores >= 1000 and offer.memory_mib >= 1024, offer.name
        assert offer.runtimes == CLOUD_RUNTIMES
        assert Tier.PROCESS not in offer.runtimes  # a cloud VM runs other people's code
        assert offer.country is None or len(offer.country) == 2


def test_shipped_catalog_has_places_and_kinds_to_choose_from() -> None:
    offers = load_catalog()
    assert {"US", "DE"} <= {offer.country for offer in offers}
    assert any(offer.gpu_count for offer in offers)
    assert any(offer.spot_price_per_hour for offer in offers)
    assert any(offer.spot_price_per_hour is None for offer in offers)


def test_sources_document_every_file() -> None:
    text = (files("treadle.weaver.providers") / "catalog" / "SOURCES.md").read_text()
    for entry in default_catalog_paths():
        assert f"`{entry.name}`" in text, entry.name


def test_one_provider_and_conversions() -> None:
    offers = {offer.name: offer for offer in load_catalog(provider="runpod")}
    assert {offer.provider for offer in offers.values()} == {"runpod"}
    a100 = offers["runpod/1x_A100-80GB_SECURE/US-TX-3"]
    assert (a100.cpu_millicores, a100.memory_mib) == (8000, 80 * 1024)
    assert (a100.gpu_count, a100.gpu_type) == (1, "a100")
    assert (a100.price_per_hour, a100.spot_price_per_hour) == (1.64, 1.19)
    assert (a100.region, a100.zone, a100.country) == ("US", "US-TX-3", "US")
    no_spot = offers["runpod/1x_RTX4000-Ada_SECURE/US-TX-3"]
    assert no_spot.spot_price_per_hour is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [("A100-80GB", "a100"), ("L4", "l4"), ("RTX 4090", "rtx4090"), ("RTX4000-Ada", "rtx4000")],
)
def test_gpu_type_names(name: str, expected: str) -> None:
    assert gpu_type(name) == expected


# files given by path


def test_a_file_of_ones_own(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "acme.csv",
        "# comments and blank lines are skipped",
        "",
        "big,A100-80GB,2,16,128,4.5,,eu-1,eu-1a,DE",
        "tiny,,,0.5,0.5,0.01,0.004,eu-1,,",
    )
    big, tiny = load_catalog([path])
    assert big.name == "acme/big/eu-1a"
    assert (big.gpu_count, big.gpu_type, big.country) == (2, "a100", "DE")
    assert (tiny.cpu_millicores, tiny.memory_mib, tiny.zone, tiny.country) == (500, 512, None, None)
    assert tiny.spot_price_per_hour == 0.004


def test_runtimes_column_overrides_the_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "dev.csv",
        "box,,,2,4,0.1,,here,,,process;namespace",
        "vm,,,2,4,0.1,,there,,,",
        header=HEADER + ",Runtimes",
    )
    box, vm = load_catalog([str(path)])
    assert box.runtimes == {Tier.PROCESS, Tier.NAMESPACE}
    assert vm.runtimes == CLOUD_RUNTIMES


def test_provider_filter_skips_other_files(tmp_path: Path) -> None:
    one = write(tmp_path, "one.csv", "a,,,1,1,0.1,,r,,")
    bad = write(tmp_path, "two.csv", "this row is broken")
    assert [o.provider for o in load_catalog([one, bad], provider="one")] == ["one"]


@pytest.mark.parametrize(
    ("row", "complaint"),
    [
        ("a,,,1,1,abc,,r,,", "Price must be a number"),
        ("a,,,1,1,0,,r,,", "Price must be a number > 0"),
        ("a,,,1,1,-1,,r,,", "Price must be a number > 0"),
        ("a,,,1,1,nan,,r,,", "Price must be a number > 0"),
        ("a,,,1,1,0.1,0.2,r,,", "SpotPrice 0.2 is above the on-demand Price 0.1"),
        ("a,,,0,1,0.1,,r,,", "vCPUs must be a number > 0"),
        ("a,,,1,,0.1,,r,,", "MemoryGiB must be a number"),
        (",,,1,1,0.1,,r,,", "InstanceType is empty"),
        ("a,,,1,1,0.1,,,,", "Region is empty"),
        ("a,A100,,1,1,0.1,,r,,", "needs an AcceleratorCount"),
        ("a,,2,1,1,0.1,,r,,", "needs an AcceleratorName"),
        ("a,A100,1.5,1,1,0.1,,r,,", "AcceleratorCount must be a whole number"),
        ("a,,,1,1,0.1,,r,,Germany", "Country must be an ISO 3166 code"),
        ("a,,,1,1,0.1,,r,,,extra", "more fields than"),
        ("a,,,1,1,0.1,,r", "fewer fields than"),
    ],
)
def test_a_bad_row_names_file_and_line(tmp_path: Path, row: str, complaint: str) -> None:
    path = write(tmp_path, "acme.csv", "fine,,,1,1,0.1,,r,,", "# a comment", row)
    with pytest.raises(CatalogError) as caught:
        load_catalog([path])
    message = caught.value.message
    assert message.startswith("acme.csv line 4: "), message
    assert complaint in message


def test_a_missing_column_is_named(tmp_path: Path) -> None:
    header = HEADER.replace(",Country", "")
    path = write(tmp_path, "acme.csv", "a,,,1,1,0.1,,r,", header=header)
    with pytest.raises(CatalogError, match=r"acme\.csv line 1: header lacks column\(s\) Country"):
        load_catalog([path])


def test_duplicate_offers_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "acme.csv", "a,,,1,1,0.1,,r,z,", "a,,,2,2,0.2,,r,z,")
    with pytest.raises(CatalogError, match=r"acme\.csv line 3: offer acme/a/z is already in"):
        load_catalog([path])


def test_unreadable_and_misnamed_files(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=r"missing\.csv: cannot read"):
        load_catalog([tmp_path / "missing.csv"])
    with pytest.raises(CatalogError, match=r"prices\.txt: .* must end in \.csv"):
        load_catalog([tmp_path / "prices.txt"])
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(CatalogError, match=r"empty\.csv: empty catalog"):
        load_catalog([empty])
