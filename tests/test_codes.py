import base64
import os

from engine import codes

# RFC 4648 base32 symbols to Crockford's, which new_code once spelled codes with.
_FROM_RFC4648 = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", codes.ALPHABET.encode())


def test_new_codes_are_valid_distinct_and_display_grouped() -> None:
    seen = {codes.new_code() for _ in range(5000)}
    assert len(seen) == 5000
    for c in list(seen)[:200]:
        assert len(c) == 17 and set(c) <= set(codes.ALPHABET)
        shown = codes.display(c)
        assert len(shown) == 21 and shown.count("-") == 4
        assert codes.normalize(shown) == c


def test_codes_spell_their_bytes_as_base32_does() -> None:
    """code_for (table look-ups) against the library it replaced: base64.b32encode of the
    same 10 bytes in Crockford's symbols, and check_char's check of that payload."""
    edges = [bytes(10), b"\xff" * 10, bytes(range(10)), b"\x80" + bytes(9)]
    for raw in edges + [os.urandom(10) for _ in range(20_000)]:
        payload = base64.b32encode(raw).translate(_FROM_RFC4648).decode()
        assert codes.code_for(raw) == payload + codes.check_char(payload), raw


def test_forgiving_reading() -> None:
    c = "0123456789ABCDEF"
    full = c + codes.check_char(c)
    messy = " " + codes.display(full).lower().replace("0", "o").replace("1", "l") + " "
    assert codes.normalize(messy) == full
    assert codes.normalize(full.replace("1", "I")) == full


def test_one_wrong_character_fails_the_check() -> None:
    full = codes.new_code()
    for i in range(17):
        for ch in codes.ALPHABET:
            if ch == full[i]:
                continue
            bad = full[:i] + ch + full[i + 1:]
            assert codes.normalize(bad) is None, (full, bad)


# Luhn mod N's one blind spot for swaps: the first and last symbols (values 0 and
# N-1) fold to the same sum in either order, as 0 and 9 do in decimal Luhn.
_UNDETECTABLE_SWAP = {frozenset("0Z")}


def test_adjacent_swap_is_caught_when_characters_differ() -> None:
    for _ in range(200):  # random codes: run enough of them to meet every position
        full = codes.new_code()
        for i in range(16):
            if full[i] != full[i + 1] and frozenset(full[i:i + 2]) not in _UNDETECTABLE_SWAP:
                swapped = full[:i] + full[i + 1] + full[i] + full[i + 2:]
                assert codes.normalize(swapped) is None, (full, i)


def test_every_adjacent_swap_of_two_symbols_but_zero_and_z_is_caught() -> None:
    for a in codes.ALPHABET:
        for b in codes.ALPHABET:
            if a == b:
                continue
            payload = "7" * 7 + a + b + "7" * 7
            full = payload + codes.check_char(payload)
            swapped = "7" * 7 + b + a + "7" * 7 + codes.check_char(payload)
            caught = codes.normalize(swapped) is None
            assert caught == (frozenset((a, b)) not in _UNDETECTABLE_SWAP), (a, b)
            assert codes.normalize(full) == full


def test_malformed() -> None:
    for text in ["", "ABC", "U" * 17, "0" * 18, "x" * 100, "ÄÖÜ"]:
        assert codes.normalize(text) is None


def _reference_normalize(text: str) -> str | None:
    """The check as first written (a loop over the symbols), to compare with."""
    if not isinstance(text, str) or len(text) > 64:
        return None
    code = text.translate(str.maketrans("", "", " -\t")).upper().translate(
        str.maketrans({"I": "1", "L": "1", "O": "0"}))
    if len(code) != 17 or any(ch not in codes.ALPHABET for ch in code):
        return None
    factor, total = 1, 0
    for ch in reversed(code):
        addend = factor * codes.ALPHABET.index(ch)
        factor = 1 if factor == 2 else 2
        total += addend // 32 + addend % 32
    return code if total % 32 == 0 else None


def test_normalize_agrees_with_the_reference_check() -> None:
    import random
    rng = random.Random(15)
    pool = codes.ALPHABET + "ilo -\tU*é１Ａ"
    texts = [codes.new_code() for _ in range(300)]
    texts += [t[:i] + rng.choice(pool) + t[i + 1:] for t in list(texts) for i in (0, 8, 16)]
    texts += ["".join(rng.choice(pool) for _ in range(rng.randint(15, 19))) for _ in range(3000)]
    valid = 0
    for t in texts:
        assert codes.normalize(t) == _reference_normalize(t), t
        valid += codes.normalize(t) is not None
    assert valid > 300  # the comparison saw valid codes, not only refusals
