"""Prompt sets for training and held-out evaluation (the per-epoch sampler is `prompts.sampler`).

The sets follow the DDPO paper (Black et al., 2023) and ddpo-pytorch: the 45 simple animals,
the 398 ImageNet-1k animal classes, and "<animal> <activity>" prompts for prompt alignment.
Everything is written out here, so a run needs no downloads and no data files, and the exact
prompts a run trained on are part of the code it ran.

Two held-out sets (animals not trained on, and everyday objects) measure whether a fine-tuned
model generalises beyond its training prompts, as in section 6.3 of the paper.
"""

from __future__ import annotations

from ddpo_ray.tiny.world import COLOURS, COUNTS, object_prompt

# The 45 animals of the DDPO paper ("simple_animals" in ddpo-pytorch).
SIMPLE_ANIMALS: tuple[str, ...] = (
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep",
    "deer", "cow", "goat", "lion", "tiger", "bear", "raccoon", "fox", "wolf",
    "lizard", "beetle", "ant", "butterfly", "fish", "shark", "whale", "dolphin", "squirrel",
    "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck", "goose", "bee",
    "pig", "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
)  # fmt: skip

# ImageNet-1k classes 0..397 (the animals), in class-index order, one name per class: the
# first synonym of the class, with ImageNet's capitalisation (proper nouns only). Each line
# holds ten classes; the comment gives the index of its first one.
IMAGENET_ANIMALS: tuple[str, ...] = (
    # 0
    "tench", "goldfish", "great white shark", "tiger shark", "hammerhead",
    "electric ray", "stingray", "cock", "hen", "ostrich",
    # 10
    "brambling", "goldfinch", "house finch", "junco", "indigo bunting",
    "robin", "bulbul", "jay", "magpie", "chickadee",
    # 20
    "water ouzel", "kite", "bald eagle", "vulture", "great grey owl",
    "European fire salamander", "common newt", "eft", "spotted salamander", "axolotl",
    # 30
    "bullfrog", "tree frog", "tailed frog", "loggerhead", "leatherback turtle",
    "mud turtle", "terrapin", "box turtle", "banded gecko", "common iguana",
    # 40
    "American chameleon", "whiptail", "agama", "frilled lizard", "alligator lizard",
    "Gila monster", "green lizard", "African chameleon", "Komodo dragon", "African crocodile",
    # 50
    "American alligator", "triceratops", "thunder snake", "ringneck snake", "hognose snake",
    "green snake", "king snake", "garter snake", "water snake", "vine snake",
    # 60
    "night snake", "boa constrictor", "rock python", "Indian cobra", "green mamba",
    "sea snake", "horned viper", "diamondback", "sidewinder", "trilobite",
    # 70
    "harvestman", "scorpion", "black and gold garden spider", "barn spider", "garden spider",
    "black widow", "tarantula", "wolf spider", "tick", "centipede",
    # 80
    "black grouse", "ptarmigan", "ruffed grouse", "prairie chicken", "peacock",
    "quail", "partridge", "African grey", "macaw", "sulphur-crested cockatoo",
    # 90
    "lorikeet", "coucal", "bee eater", "hornbill", "hummingbird",
    "jacamar", "toucan", "drake", "red-breasted merganser", "goose",
    # 100
    "black swan", "tusker", "echidna", "platypus", "wallaby",
    "koala", "wombat", "jellyfish", "sea anemone", "brain coral",
    # 110
    "flatworm", "nematode", "conch", "snail", "slug",
    "sea slug", "chiton", "chambered nautilus", "Dungeness crab", "rock crab",
    # 120
    "fiddler crab", "king crab", "American lobster", "spiny lobster", "crayfish",
    "hermit crab", "isopod", "white stork", "black stork", "spoonbill",
    # 130
    "flamingo", "little blue heron", "American egret", "bittern", "crane",
    "limpkin", "European gallinule", "American coot", "bustard", "ruddy turnstone",
    # 140
    "red-backed sandpiper", "redshank", "dowitcher", "oystercatcher", "pelican",
    "king penguin", "albatross", "grey whale", "killer whale", "dugong",
    # 150
    "sea lion", "Chihuahua", "Japanese spaniel", "Maltese dog", "Pekinese",
    "Shih-Tzu", "Blenheim spaniel", "papillon", "toy terrier", "Rhodesian ridgeback",
    # 160
    "Afghan hound", "basset", "beagle", "bloodhound", "bluetick",
    "black-and-tan coonhound", "Walker hound", "English foxhound", "redbone", "borzoi",
    # 170
    "Irish wolfhound", "Italian greyhound", "whippet", "Ibizan hound", "Norwegian elkhound",
    "otterhound", "Saluki", "Scottish deerhound", "Weimaraner", "Staffordshire bullterrier",
    # 180
    "American Staffordshire terrier", "Bedlington terrier", "Border terrier",
    "Kerry blue terrier", "Irish terrier", "Norfolk terrier", "Norwich terrier",
    "Yorkshire terrier", "wire-haired fox terrier", "Lakeland terrier",
    # 190
    "Sealyham terrier", "Airedale", "cairn", "Australian terrier", "Dandie Dinmont",
    "Boston bull", "miniature schnauzer", "giant schnauzer", "standard schnauzer",
    "Scotch terrier",
    # 200
    "Tibetan terrier", "silky terrier", "soft-coated wheaten terrier",
    "West Highland white terrier", "Lhasa", "flat-coated retriever", "curly-coated retriever",
    "golden retriever", "Labrador retriever", "Chesapeake Bay retriever",
    # 210
    "German short-haired pointer", "vizsla", "English setter", "Irish setter", "Gordon setter",
    "Brittany spaniel", "clumber", "English springer", "Welsh springer spaniel",
    "cocker spaniel",
    # 220
    "Sussex spaniel", "Irish water spaniel", "kuvasz", "schipperke", "groenendael",
    "malinois", "briard", "kelpie", "komondor", "Old English sheepdog",
    # 230
    "Shetland sheepdog", "collie", "Border collie", "Bouvier des Flandres", "Rottweiler",
    "German shepherd", "Doberman", "miniature pinscher", "Greater Swiss Mountain dog",
    "Bernese mountain dog",
    # 240
    "Appenzeller", "Entlebucher", "boxer", "bull mastiff", "Tibetan mastiff",
    "French bulldog", "Great Dane", "Saint Bernard", "Eskimo dog", "malamute",
    # 250
    "Siberian husky", "dalmatian", "affenpinscher", "basenji", "pug",
    "Leonberg", "Newfoundland", "Great Pyrenees", "Samoyed", "Pomeranian",
    # 260
    "chow", "keeshond", "Brabancon griffon", "Pembroke", "Cardigan",
    "toy poodle", "miniature poodle", "standard poodle", "Mexican hairless", "timber wolf",
    # 270
    "white wolf", "red wolf", "coyote", "dingo", "dhole",
    "African hunting dog", "hyena", "red fox", "kit fox", "Arctic fox",
    # 280
    "grey fox", "tabby", "tiger cat", "Persian cat", "Siamese cat",
    "Egyptian cat", "cougar", "lynx", "leopard", "snow leopard",
    # 290
    "jaguar", "lion", "tiger", "cheetah", "brown bear",
    "American black bear", "ice bear", "sloth bear", "mongoose", "meerkat",
    # 300
    "tiger beetle", "ladybug", "ground beetle", "long-horned beetle", "leaf beetle",
    "dung beetle", "rhinoceros beetle", "weevil", "fly", "bee",
    # 310
    "ant", "grasshopper", "cricket", "walking stick", "cockroach",
    "mantis", "cicada", "leafhopper", "lacewing", "dragonfly",
    # 320
    "damselfly", "admiral", "ringlet", "monarch", "cabbage butterfly",
    "sulphur butterfly", "lycaenid", "starfish", "sea urchin", "sea cucumber",
    # 330
    "wood rabbit", "hare", "Angora", "hamster", "porcupine",
    "fox squirrel", "marmot", "beaver", "guinea pig", "sorrel",
    # 340
    "zebra", "pig", "wild boar", "warthog", "hippopotamus",
    "ox", "water buffalo", "bison", "ram", "bighorn",
    # 350
    "ibex", "hartebeest", "impala", "gazelle", "Arabian camel",
    "llama", "weasel", "mink", "polecat", "black-footed ferret",
    # 360
    "otter", "skunk", "badger", "armadillo", "three-toed sloth",
    "orangutan", "gorilla", "chimpanzee", "gibbon", "siamang",
    # 370
    "guenon", "patas", "baboon", "macaque", "langur",
    "colobus", "proboscis monkey", "marmoset", "capuchin", "howler monkey",
    # 380
    "titi", "spider monkey", "squirrel monkey", "Madagascar cat", "indri",
    "Indian elephant", "African elephant", "lesser panda", "giant panda", "barracouta",
    # 390
    "eel", "coho", "rock beauty", "anemone fish", "sturgeon",
    "gar", "lionfish", "puffer",
)  # fmt: skip

ACTIVITIES: tuple[str, ...] = ("washing the dishes", "riding a bike", "playing chess")


def _with_article(noun: str) -> str:
    """'a cat', 'an ant': the article by the first letter, as ddpo-pytorch does."""
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


# "a cat washing the dishes", ..., animal-major (all activities of one animal are adjacent).
NOUNS_ACTIVITIES: tuple[str, ...] = tuple(
    f"{_with_article(animal)} {activity}" for animal in SIMPLE_ANIMALS for activity in ACTIVITIES
)

# Held out from training: common animals absent from SIMPLE_ANIMALS, to test whether an
# aesthetic/compressibility fine-tune transfers to subjects it never saw.
HELD_OUT_ANIMALS: tuple[str, ...] = (
    "elephant", "giraffe", "penguin", "owl", "octopus", "panda", "rhinoceros", "hippopotamus",
    "crocodile", "flamingo", "koala", "parrot", "peacock", "seal", "otter", "swan",
    "eagle", "crab", "jellyfish", "snail", "donkey", "cheetah", "ostrich", "walrus",
)  # fmt: skip

# Held out from training: things that are not animals at all (the paper's hardest transfer).
INANIMATE_OBJECTS: tuple[str, ...] = (
    "chair", "teapot", "bicycle", "lamp", "umbrella", "clock", "guitar", "bookshelf",
    "kettle", "backpack", "sofa", "piano", "violin", "toaster", "bottle", "candle",
    "mug", "telephone", "suitcase", "vase", "hat", "shoe", "key", "scissors",
)  # fmt: skip

# The names a config's `prompts.name` / `prompts.eval_name` may use.
# The `tiny` model's world (ddpo_ray/tiny/world.py): prompts name only the objects, leaving
# background, size and position to the model. Diamonds are held out of the training prompts
# (the base model knows them from pretraining), like the paper's unseen animals.
TINY_SHAPES: tuple[str, ...] = tuple(
    object_prompt(count, colour, shape)
    for shape in ("circle", "square", "triangle")
    for colour in COLOURS
    for count in COUNTS
)
TINY_SHAPES_HELD_OUT: tuple[str, ...] = tuple(
    object_prompt(count, colour, "diamond") for colour in COLOURS for count in COUNTS
)

PROMPT_SETS: dict[str, tuple[str, ...]] = {
    "simple_animals": SIMPLE_ANIMALS,
    "imagenet_animals": IMAGENET_ANIMALS,
    "nouns_activities": NOUNS_ACTIVITIES,
    "held_out_animals": HELD_OUT_ANIMALS,
    "inanimate_objects": INANIMATE_OBJECTS,
    "held_out": HELD_OUT_ANIMALS + INANIMATE_OBJECTS,
    "tiny_shapes": TINY_SHAPES,
    "tiny_shapes_held_out": TINY_SHAPES_HELD_OUT,
}


def get_prompts(name: str) -> tuple[str, ...]:
    """The prompt set called `name`; a typo fails here with the list of valid names."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; expected one of {sorted(PROMPT_SETS)}")
    return PROMPT_SETS[name]


# Eval sets made of named groups (the held-out table reports each); any other set is one group.
PROMPT_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "held_out": {"held_out_animals": HELD_OUT_ANIMALS, "inanimate_objects": INANIMATE_OBJECTS},
}


def prompt_groups(name: str) -> dict[str, tuple[str, ...]]:
    """{group name: prompts} of the set called `name` (a single group named `name` if it has none)."""
    return dict(PROMPT_GROUPS.get(name) or {name: get_prompts(name)})
