"""The invented world of the sample corpus (megalm.data.corpus): word lists, number words, people and towns.

The word lists pair each English word with its Chinese translation. `build_world(seed)` draws a few
dozen people with fixed attributes (town, job, age, colour, food, hobby, belongings, pet, best friend)
and a dozen towns, and for some people marks facts that the corpus never states directly (held out
for the eval task in megalm/eval/world.py). Everything is drawn from `random.Random` seeded by strings,
so one seed gives the same world in any process.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

# ----------------------------------------------------------------------------- word lists
# (english, chinese, is_female)
_PEOPLE = (
    ("Mara", "玛拉", True), ("Tobin", "托宾", False), ("Lena", "莉娜", True), ("Oskar", "奥斯卡", False),
    ("Nina", "妮娜", True), ("Hugo", "雨果", False), ("Ada", "艾达", True), ("Milo", "米洛", False),
    ("Iris", "艾丽斯", True), ("Jonas", "约纳斯", False), ("Ruby", "露比", True), ("Theo", "西奥", False),
    ("Clara", "克拉拉", True), ("Emil", "埃米尔", False), ("Vera", "薇拉", True), ("Leo", "里奥", False),
    ("Anna", "安娜", True), ("Max", "马克斯", False), ("Sofia", "索菲亚", True), ("Paul", "保罗", False),
    ("Yara", "雅拉", True), ("Omar", "奥马尔", False), ("Wang Fang", "王芳", True), ("Li Ming", "李明", False),
    ("Chen Jing", "陈静", True), ("Zhang Wei", "张伟", False), ("Sun Li", "孙丽", True), ("Liu Yang", "刘洋", False),
    ("Lin Yu", "林雨", True), ("Zhao Lei", "赵磊", False), ("Wu Xia", "吴霞", True), ("Zhou Hao", "周浩", False),
)
_TOWNS = (
    ("Bluestone", "青石"), ("Whiteriver", "白河"), ("Pinewood", "松林"), ("Goldhill", "金山"),
    ("Northport", "北港"), ("Southbay", "南湾"), ("Eastbridge", "东桥"), ("Westvale", "西谷"),
    ("Redrock", "红岩"), ("Stonelake", "石湖"), ("Cloudtown", "云城"), ("Greenfield", "绿野"),
)
_TOWN_SETTINGS = (
    ("by the sea", "在海边"), ("near the mountains", "在山脚下"), ("on a wide river", "在大河边"),
    ("beside a quiet lake", "在安静的湖边"), ("in a green forest", "在绿色的森林里"),
)
_LANDMARKS = (
    ("an old bridge", "一座古老的桥"), ("a big market", "一个很大的市场"), ("a tall tower", "一座高高的塔"),
    ("a beautiful park", "一个美丽的公园"), ("a small museum", "一个小博物馆"),
    ("a busy train station", "一个热闹的火车站"), ("a famous library", "一个有名的图书馆"),
)
# (english, chinese, what they do every morning en, zh)
_JOBS = (
    ("baker", "面包师", "bakes bread", "烤面包"), ("teacher", "老师", "teaches children to read", "教孩子们读书"),
    ("doctor", "医生", "helps sick people", "帮助生病的人"), ("farmer", "农民", "works in the fields", "在田里干活"),
    ("painter", "画家", "paints pictures", "画画"), ("driver", "司机", "drives a bus", "开公交车"),
    ("cook", "厨师", "cooks in a restaurant", "在饭店做饭"), ("nurse", "护士", "works in the hospital", "在医院工作"),
    ("fisher", "渔夫", "catches fish", "打鱼"), ("writer", "作家", "writes stories", "写故事"),
    ("engineer", "工程师", "builds bridges", "造桥"), ("gardener", "园丁", "plants trees and flowers", "种树种花"),
    ("tailor", "裁缝", "makes clothes", "做衣服"), ("singer", "歌手", "sings songs", "唱歌"),
    ("postman", "邮递员", "delivers letters", "送信"), ("shopkeeper", "店主", "opens a small shop", "开一家小商店"),
)
_COLOURS = (
    ("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("white", "白色"), ("black", "黑色"),
    ("purple", "紫色"), ("orange", "橙色"), ("grey", "灰色"), ("pink", "粉色"), ("brown", "棕色"),
)
_FOODS = (
    ("rice", "米饭"), ("noodles", "面条"), ("apples", "苹果"), ("bread", "面包"), ("fish", "鱼"),
    ("dumplings", "饺子"), ("oranges", "橙子"), ("eggs", "鸡蛋"), ("cake", "蛋糕"), ("tofu", "豆腐"),
    ("pears", "梨"), ("grapes", "葡萄"), ("carrots", "胡萝卜"), ("tomatoes", "西红柿"), ("peaches", "桃子"),
)
_HOBBIES = (
    ("reading", "看书"), ("swimming", "游泳"), ("singing", "唱歌"), ("drawing", "画画"), ("running", "跑步"),
    ("fishing", "钓鱼"), ("playing chess", "下棋"), ("dancing", "跳舞"), ("cooking", "做饭"),
    ("gardening", "种花"), ("playing the piano", "弹钢琴"), ("writing letters", "写信"),
    ("climbing mountains", "爬山"), ("playing football", "踢足球"),
)
# (english, chinese, measure word)
_THINGS = (
    ("bicycle", "自行车", "辆"), ("car", "汽车", "辆"), ("umbrella", "雨伞", "把"), ("chair", "椅子", "把"),
    ("hat", "帽子", "顶"), ("cup", "杯子", "个"), ("bag", "包", "个"), ("book", "书", "本"), ("kite", "风筝", "个"),
    ("coat", "外套", "件"), ("scarf", "围巾", "条"), ("boat", "船", "条"), ("lamp", "灯", "盏"),
)
_PETS = (
    ("cat", "猫", "只"), ("dog", "狗", "只"), ("rabbit", "兔子", "只"), ("bird", "鸟", "只"), ("duck", "鸭子", "只"),
    ("horse", "马", "匹"), ("goldfish", "金鱼", "条"), ("turtle", "乌龟", "只"),
)
_PET_NAMES = (
    ("Pepper", "胡椒"), ("Button", "纽扣"), ("Sunny", "阳光"), ("Cookie", "饼干"), ("Shadow", "影子"),
    ("Bean", "豆豆"), ("Snowball", "雪球"), ("Lucky", "幸运"), ("Pebble", "石子"), ("Maple", "枫叶"),
)
# countable things for word problems: (singular, plural, chinese, measure word)
_COUNTABLES = (
    ("apple", "apples", "苹果", "个"), ("pear", "pears", "梨", "个"), ("egg", "eggs", "鸡蛋", "个"),
    ("peach", "peaches", "桃子", "个"), ("book", "books", "书", "本"), ("pencil", "pencils", "铅笔", "支"),
    ("flower", "flowers", "花", "朵"), ("cup", "cups", "杯子", "个"), ("fish", "fish", "鱼", "条"),
)
_DAYS = (
    ("Monday", "星期一"), ("Tuesday", "星期二"), ("Wednesday", "星期三"), ("Thursday", "星期四"),
    ("Friday", "星期五"), ("Saturday", "星期六"), ("Sunday", "星期日"),
)
_MONTHS_EN = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
              "October", "November", "December")
# (season, chinese, months (0-based), weather en, weather zh)
_SEASONS = (
    ("spring", "春天", (2, 3, 4), "warm and the flowers open", "很暖和，花都开了"),
    ("summer", "夏天", (5, 6, 7), "hot and the days are long", "很热，白天很长"),
    ("autumn", "秋天", (8, 9, 10), "cool and the leaves turn yellow", "很凉快，树叶变黄了"),
    ("winter", "冬天", (11, 0, 1), "cold and sometimes it snows", "很冷，有时候下雪"),
)
# weather and what a person does because of it: (weather en, zh, reaction en, zh)
_WEATHER = (
    ("it rained", "下雨了", "stayed at home", "待在家里"),
    ("it was sunny", "天气很好", "went to the park", "去了公园"),
    ("it was very cold", "天气很冷", "wore a warm coat", "穿上了厚外套"),
    ("it was windy", "刮大风了", "flew a kite", "去放风筝"),
    ("it snowed", "下雪了", "made a snowman", "堆了一个雪人"),
    ("it was hot", "天气很热", "went swimming in the river", "去河里游泳"),
)

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_ZH_DIGITS = "零一二三四五六七八九"
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
             "eleventh", "twelfth")


def number_en(n: int) -> str:
    """English words for 0 <= n <= 100."""
    if n < 20:
        return _ONES[n]
    if n == 100:
        return "one hundred"
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("-" + _ONES[ones] if ones else "")


def number_zh(n: int) -> str:
    """Chinese numerals for 0 <= n <= 100 (十一, 二十, 三十四, 一百)."""
    if n < 10:
        return _ZH_DIGITS[n]
    if n == 100:
        return "一百"
    tens, ones = divmod(n, 10)
    return ("" if tens == 1 else _ZH_DIGITS[tens]) + "十" + (_ZH_DIGITS[ones] if ones else "")


def _count_zh(n: int) -> str:
    """A Chinese numeral before a measure word: 2 is 两."""
    return "两" if n == 2 else number_zh(n)


def _first_person(phrase: str) -> str:
    """'bakes bread' -> 'bake bread', 'teaches children' -> 'teach children'."""
    verb, rest = phrase.split(" ", 1)
    verb = verb[:-2] if verb.endswith(("ches", "shes")) else verb[:-1]
    return f"{verb} {rest}"


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


_MONTHS_ZH = tuple(number_zh(i + 1) + "月" for i in range(12))
_MONTHS = tuple(zip(_MONTHS_EN, _MONTHS_ZH))

# ----------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class Person:
    en: str
    zh: str
    female: bool
    town: int
    job: int
    age: int
    colour: int
    food: int
    hobby: int
    thing: int
    thing_colour: int
    pet: int
    pet_name: int
    friend: int  # index into World.people
    held: frozenset = frozenset()  # of HELD_ATTRIBUTES: facts never stated directly (module docstring)


@dataclass(frozen=True)
class Town:
    en: str
    zh: str
    setting: int
    landmark: int
    food: int
    milestone: int  # kilometres along the one road that joins all towns


@dataclass(frozen=True)
class World:
    people: tuple[Person, ...]
    towns: tuple[Town, ...]


# the attributes whose direct statements are held out for some people, and how many people each
HELD_ATTRIBUTES = ("town", "job", "colour", "food")
HELD_PER_ATTRIBUTE = 8


def build_world(seed: int = 0) -> World:
    """The people and towns of one seed: every fact the corpus states comes from here."""
    rng = random.Random(f"megalm-corpus-world:{seed}")
    milestones = rng.sample(range(0, 100), len(_TOWNS))
    towns = tuple(
        Town(en, zh, rng.randrange(len(_TOWN_SETTINGS)), rng.randrange(len(_LANDMARKS)),
             rng.randrange(len(_FOODS)), milestone)
        for (en, zh), milestone in zip(_TOWNS, milestones)
    )
    order = rng.sample(range(len(_PEOPLE)), len(_PEOPLE))
    people = []
    for position, index in enumerate(order):
        en, zh, female = _PEOPLE[index]
        friend = rng.randrange(len(order) - 1)
        friend += friend >= position  # anyone but themself
        people.append(Person(
            en, zh, female, town=rng.randrange(len(towns)), job=rng.randrange(len(_JOBS)),
            age=rng.randint(18, 75), colour=rng.randrange(len(_COLOURS)), food=rng.randrange(len(_FOODS)),
            hobby=rng.randrange(len(_HOBBIES)), thing=rng.randrange(len(_THINGS)),
            thing_colour=rng.randrange(len(_COLOURS)), pet=rng.randrange(len(_PETS)),
            pet_name=rng.randrange(len(_PET_NAMES)), friend=friend,
        ))
    held_rng = random.Random(f"megalm-corpus-held-out:{seed}")  # its own stream: the facts stay those above
    held: list[set] = [set() for _ in people]
    for attribute in HELD_ATTRIBUTES:
        for index in held_rng.sample(range(len(people)), HELD_PER_ATTRIBUTE):
            held[index].add(attribute)
    people = [dataclasses.replace(p, held=frozenset(h)) for p, h in zip(people, held)]
    return World(tuple(people), towns)
