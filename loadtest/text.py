"""Real-looking English text of an exact token length, from a built-in word list (no download).

Every word below is a single token with its leading space under SmolLM2's tokenizer (a test checks it),
and so are the sentence starters, "." and ",". Text built from them therefore has exactly as many tokens
as pieces, which makes word counts exact for SmolLM2 and a close estimate for other BPE tokenizers; with
a real tokenizer the length is checked and repaired after building.
"""

from __future__ import annotations

import random

from loadtest.tokens import TokenCounter

WORDS: tuple[str, ...] = tuple(
    """
about above across act add after again against age ago agree air all allow almost alone along already
also always among amount and animal answer any appear apply area arm around art ask at away back bad bag
ball bank base be bear beat beautiful because become bed before begin behind believe best better between
big bill bird black blood blue board boat body book born both box boy break bring brother build building
business but buy by call came can car card care carry case cat catch cause center century certain chair
chance change character charge check child choice choose church city class clear close cold college
color come common company compare contain control cook cool corner cost could country course cover
create cross cup current cut dark data day dead deal dear decide deep degree describe design detail
develop did die different difficult dinner direction do doctor dog door down draw dream drive drop dry
during each early earth east easy eat edge effect effort eight either else end energy enjoy enough enter
even evening event ever every exactly example expect experience eye face fact fall family far farm fast
father fear feel few field fight figure fill film final find fine finger finish fire first fish five
floor fly follow food foot for force forest form forward four free friend from front full fun game
garden gas general get girl give glass go good great green ground group grow guess gun hair half hand
happen happy hard have he head hear heart heat heavy help her here high hill him his history hold home
hope horse hot hour house how huge human hundred idea if image imagine important in include increase
indeed inside instead interest into island it its job join just keep key kid kind king kitchen know lake
land language large last late laugh law lay lead learn least leave left leg less let letter level lie
life light like line list listen little live long look lose lot love low machine main make man many map
mark market matter may mean measure meet member memory mention message method middle might mile milk
mind minute miss model moment money month moon more morning most mother mountain move much music must
name nation nature near need never new news next nice night nine no north nose not note nothing notice
now number object ocean of off offer office often oil old on once one only open or order other our out
over own page paint paper part party pass past path pattern pay people perhaps person pick picture piece
place plan plant play point police poor popular position possible power prepare present press pretty
price problem process produce program provide public pull push put question quick quiet quite rain raise
reach read ready real reason receive record red remember report rest result return rich ride right river
road rock room round rule run safe same save say school science sea season seat second see seem sell
send sense serve set seven several shape share she ship short should show side sign simple since sing
sit six size skin sky sleep slow small smile snow so soft some son song soon sort sound south space
speak special spend spring square stand star start state station stay step still stone stop store story
street strong student study such summer sun support sure surface system table take talk tall teach team
tell ten test than that the their them then there these they thing think third this those though thought
three through time today together too top total toward town track trade train travel tree trip true try
turn two under understand until up upon us use usual valley value very view visit voice wait walk wall
want war warm wash watch water wave way we wear weather week weight well west what wheel when where
whether which while white who whole why wide wife wild will wind window winter wish with within without
woman wonder wood word work world would write year yes yet you young""".split()
)

# Capitalised sentence openers, each one token both at the start of a text and after a space.
STARTERS: tuple[str, ...] = tuple(
    "The This We It In When Our Many Some Every A After Then Most Each They She He You There Today Later Now"
    " Here".split()
)

MIN_SENTENCE_WORDS = 6
MAX_SENTENCE_WORDS = 18


class TextMaker:
    """Builds text of an exact token count under `counter`, deterministically from `rng`."""

    def __init__(self, counter: TokenCounter, rng: random.Random) -> None:
        self.counter = counter
        self.rng = rng
        self._costs: dict[str, int] = {}
        # filler words that cost one token after a space, used to top up a text to its exact length
        self._fillers = [word for word in WORDS[:200] if self._cost(" " + word) == 1] or ["the"]

    def _cost(self, piece: str) -> int:
        cost = self._costs.get(piece)
        if cost is None:
            cost = self._costs[piece] = self.counter.count(piece)
        return cost

    def _sentence(self, num_words: int, is_first: bool, can_have_commas: bool = True) -> list[str]:
        starter = self.rng.choice(STARTERS)
        pieces = [starter if is_first else " " + starter]
        for index in range(num_words - 1):
            pieces.append(" " + self.rng.choice(WORDS))
            if can_have_commas and 3 <= index < num_words - 3 and self.rng.random() < 0.06:
                pieces.append(",")
        pieces.append(".")
        return pieces

    def text(self, num_tokens: int, is_continuation: bool = False) -> str:
        """`num_tokens` tokens of sentences. `is_continuation`: the text follows other text, so it starts with
        a space (keeping the token boundary where it is when texts are joined)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        pieces: list[str] = []
        total = 0
        while total < num_tokens:
            remaining = num_tokens - total
            num_words = self.rng.randint(MIN_SENTENCE_WORDS, MAX_SENTENCE_WORDS)
            is_last = remaining <= num_words + MIN_SENTENCE_WORDS
            if is_last:
                num_words = max(1, remaining - 1)  # end on a full sentence where the costs allow it
            is_first = not pieces and not is_continuation
            sentence = self._sentence(num_words, is_first=is_first, can_have_commas=not is_last)
            fitted = 0
            for piece in sentence:
                cost = self._cost(piece)
                if total + cost > num_tokens:
                    break
                pieces.append(piece)
                total += cost
                fitted += 1
            if fitted < len(sentence):
                break
        self._top_up(pieces, num_tokens, total)
        text = "".join(pieces)
        if self.counter.is_exact:
            text = self._repair(pieces, num_tokens)
        return text

    def _top_up(self, pieces: list[str], num_tokens: int, total: int) -> None:
        while total < num_tokens:
            if not pieces:
                pieces.append(self.rng.choice(STARTERS))
            else:
                pieces.append(" " + self.rng.choice(self._fillers))
            total += self._cost(pieces[-1])

    def _repair(self, pieces: list[str], num_tokens: int) -> str:
        """Tokenizers merge across some boundaries the per-piece costs cannot see: count the whole text and
        trim or pad until it is exact (a few rounds at most; gives up rather than loop)."""
        for _ in range(16):
            count = self.counter.count("".join(pieces))
            if count == num_tokens:
                break
            if count > num_tokens and pieces:
                pieces.pop()
            else:
                pieces.append(" " + self.rng.choice(self._fillers))
        return "".join(pieces)
