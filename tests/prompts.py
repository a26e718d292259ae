"""Deterministic test prompts of known sizes (no downloads)."""

SHORT = "The three primary colors are"
MEDIUM = (
    "A lighthouse keeper wrote in his log every evening. He noted the wind, the colour of the sea, the ships "
    "that passed and the birds that rested on the railing. Over forty years the log grew to twelve volumes. "
    "When he retired, the town library asked for the books, and a teacher began reading them aloud to her "
    "class, one page each morning. The children learned the names of winds and of ships. In the last volume "
    "the keeper wrote a single line about the day he left the tower. That line was"
)
_FACTS = [
    "The river Loire is the longest river in France.",
    "Copper turns green when it reacts with air and water over many years.",
    "Honeybees communicate the direction of flowers with a waggle dance.",
    "The Pacific Ocean covers more area than all land on Earth combined.",
    "A leap year adds one day to February every four years.",
    "Granite forms when magma cools slowly deep below the surface.",
    "Owls can turn their heads much further than most other birds.",
    "The first printed newspapers appeared in Europe in the seventeenth century.",
]


def long_prompt(num_sentences: int = 100) -> str:
    """Over 1,000 tokens of varied, numbered facts followed by a question."""
    lines = [f"Fact {i + 1}: {_FACTS[(i * 3) % len(_FACTS)]}" for i in range(num_sentences)]
    return "\n".join(lines) + "\nQuestion: which fact mentions owls? Answer:"


def tagged(tag: str, text: str) -> str:
    """A distinct first line, so that no engine can serve the prompt from its prefix cache."""
    return f"[{tag}]\n{text}"
