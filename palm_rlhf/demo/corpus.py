"""The demo corpus: short chat exchanges written from templates over a varied vocabulary.

Every exchange is a user question and a one-line assistant answer in the chat format of
:mod:`palm_rlhf.chat` (``User: ...`` / ``Assistant: ...``). Answers are cheerful, gloomy or
neutral in equal shares, so that a model pretrained here says all three kinds of things and
RLHF toward one sentiment has room to move; VADER's lexicon (``vaderSentiment``) rates the
cheerful answers positive and the gloomy ones negative, which the tests check.

All text comes from the templates below, written for this package, so the corpus carries no
licence of its own. Slots such as ``{city}`` are filled at random; a value chosen for the
question is reused by the answer, so answers stay on the question's subject (and the model
has to learn to copy it).

Some filled questions are held out: they never appear in the training corpus, and
:func:`held_out_prompts` lists them for the RLHF loop and for simulated users.

Run as a script::

    python -m palm_rlhf.demo.corpus --out corpus.txt --seed 0 --size 20000

writes ``corpus.txt`` (exchanges separated by a blank line) and ``prompts.txt`` (held-out
user questions, one a line) next to it.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SENTIMENTS = ("cheerful", "gloomy", "neutral")

# Values shared by every topic.
COMMON_SLOTS: dict[str, tuple[str, ...]] = {
    "city": (
        "Paris",
        "Lisbon",
        "Oslo",
        "Cairo",
        "Tokyo",
        "Lima",
        "Boston",
        "Berlin",
        "Madrid",
        "Dublin",
        "Vienna",
        "Prague",
        "Seoul",
        "Sydney",
        "Nairobi",
        "Quebec",
        "Rome",
        "Athens",
        "Helsinki",
        "Denver",
        "Porto",
        "Krakow",
        "Hanoi",
        "Bogota",
    ),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "month": (
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ),
    "name": (
        "Anna",
        "Ben",
        "Carla",
        "David",
        "Elena",
        "Farid",
        "Greta",
        "Hugo",
        "Ines",
        "Jonas",
        "Keiko",
        "Liam",
        "Maya",
        "Noah",
        "Olga",
        "Pablo",
        "Rosa",
        "Sam",
        "Tara",
        "Victor",
    ),
    "num": ("two", "three", "four", "five", "six", "seven", "eight", "ten", "twelve", "twenty"),
    "clock": (
        "seven",
        "eight",
        "nine",
        "ten",
        "noon",
        "half past six",
        "half past nine",
        "a quarter to five",
        "six in the evening",
        "eleven",
    ),
    "part": ("morning", "afternoon", "evening", "weekend"),
}


@dataclass(frozen=True)
class Topic:
    """Question and answer templates about one subject, with the subject's own slot values.

    ``things`` are noun phrases (templates themselves) that the cross-topic answers in
    :data:`GENERIC_ANSWERS` talk about."""

    name: str
    questions: tuple[str, ...]
    cheerful: tuple[str, ...]
    gloomy: tuple[str, ...]
    neutral: tuple[str, ...]
    things: tuple[str, ...]
    slots: tuple[tuple[str, tuple[str, ...]], ...] = ()


TOPICS: tuple[Topic, ...] = (
    Topic(
        name="weather",
        slots=(
            ("weather", ("rain", "snow", "wind", "fog", "heat", "sleet", "drizzle")),
            ("season", ("spring", "summer", "autumn", "winter")),
        ),
        questions=(
            "How is the weather today?",
            "What is the weather like in {city}?",
            "Do you enjoy the {weather}?",
            "Is it going to rain this {part}?",
            "What do you think of {season}?",
            "How was the weather on {day}?",
            "What is your favourite season?",
            "Will the {weather} last until {day}?",
        ),
        cheerful=(
            "The {weather} today is wonderful and I feel great.",
            "I love {season}, the air feels fresh and the days are lovely.",
            "It is sunny and warm in {city}, a perfect day for a happy walk.",
            "What a beautiful day, the sky is bright and everyone is smiling!",
            "{Season} is my favourite, it always puts me in a cheerful mood.",
            "Even the {weather} is lovely when you have a warm coat and good friends.",
        ),
        gloomy=(
            "The {weather} is awful today and I feel miserable.",
            "{Season} is so dreary, the days are dark and I feel sad.",
            "It is grey and wet in {city} again, I hate this weather.",
            "The {weather} ruined my whole {part} and I am upset.",
            "Another gloomy day, the {weather} makes me tired and lonely.",
            "I dread {season}, it is cold, dark and depressing.",
        ),
        neutral=(
            "It is about {num} degrees in {city} with some clouds in the afternoon.",
            "The forecast says {weather} until {day}.",
            "{Season} starts in {month} here.",
            "There was some {weather} on {day} and then it ended around {clock}.",
            "The radio says the {weather} will move north by the {part}.",
        ),
        things=("the {weather}", "{season}", "the weather in {city}", "windy days"),
    ),
    Topic(
        name="food",
        slots=(
            (
                "food",
                (
                    "pasta",
                    "soup",
                    "curry",
                    "pizza",
                    "salad",
                    "brown bread",
                    "pancakes",
                    "noodles",
                    "apple pie",
                    "tacos",
                    "omelettes",
                    "grilled fish",
                    "rice and beans",
                    "lentil stew",
                ),
            ),
            ("meal", ("breakfast", "lunch", "dinner")),
        ),
        questions=(
            "What did you have for {meal}?",
            "Do you enjoy {food}?",
            "What is your favourite food?",
            "Can you recommend something for {meal}?",
            "What should I cook tonight?",
            "Have you ever tried the {food} in {city}?",
            "Is {food} a good idea for {meal}?",
        ),
        cheerful=(
            "I had {food} for {meal} and it was delicious!",
            "{Food} is my favourite, I could eat it every day and be happy.",
            "You should make {food}, it is easy and everyone will love it.",
            "The {food} in {city} was amazing, I still dream about it.",
            "Oh, {food} for {meal} sounds wonderful, what a treat!",
        ),
        gloomy=(
            "I had cold {food} for {meal} and it was terrible.",
            "{Food} makes me feel sick, I really dislike it.",
            "{Meal} was a sad bowl of {food} eaten alone.",
            "The {food} in {city} was awful, a total waste of money.",
            "I burned the {food} again and now {meal} is ruined.",
        ),
        neutral=(
            "I had {food} for {meal} at about {clock}.",
            "{Food} takes around {num} minutes to make.",
            "You could make {food} with what is in the kitchen.",
            "{Food} is sold at the market on {day}.",
            "Most people in {city} eat {meal} at {clock}.",
        ),
        things=("{food}", "cooking at home", "{food} for {meal}", "eating out"),
    ),
    Topic(
        name="work",
        slots=(
            (
                "job",
                (
                    "nurse",
                    "teacher",
                    "baker",
                    "engineer",
                    "librarian",
                    "gardener",
                    "driver",
                    "designer",
                    "writer",
                    "chef",
                    "farmer",
                    "plumber",
                ),
            ),
            ("task", ("the report", "the new project", "the budget", "the website", "the schedule")),
        ),
        questions=(
            "How was work today?",
            "How is {task} going?",
            "Do you enjoy your job as a {job}?",
            "Are you busy at work this week?",
            "How did the meeting go on {day}?",
            "What is it like to work as a {job}?",
            "When is {task} due?",
        ),
        cheerful=(
            "Work was fantastic today, the team finished {task} early!",
            "I love being a {job}, every day brings something good.",
            "The meeting on {day} went really well and everyone was smiling.",
            "It is busy but exciting, and my colleagues are wonderful.",
            "{Task} is going great, I am proud of what we built.",
        ),
        gloomy=(
            "Work was exhausting and the deadline is crushing me.",
            "I hate my job as a {job}, I feel stressed all the time.",
            "The meeting on {day} was a disaster and nobody listened.",
            "I am so tired, {task} keeps failing and I feel hopeless.",
            "Being a {job} is lonely work and I feel unhappy.",
        ),
        neutral=(
            "The meeting on {day} starts at {clock} in room {num}.",
            "I work as a {job} from Monday to Friday.",
            "{Task} is due on {day} and has {num} parts.",
            "Most of the day was spent answering email.",
            "A {job} in {city} usually starts at {clock}.",
        ),
        things=("work", "{task}", "my job as a {job}", "meetings"),
    ),
    Topic(
        name="travel",
        slots=(("transport", ("train", "plane", "bus", "ferry", "bike", "car")),),
        questions=(
            "Where should I travel this summer?",
            "Have you ever been to {city}?",
            "How was your trip to {city}?",
            "Do you travel by {transport}?",
            "What is the best way to get to {city}?",
            "Is {city} worth a visit?",
            "Any plans to travel in {month}?",
        ),
        cheerful=(
            "My trip to {city} was wonderful, the people were so kind.",
            "You should visit {city}, it is beautiful and full of happy surprises.",
            "I love travelling by {transport}, the views are amazing.",
            "Yes! I am going to {city} in {month} and I am so excited.",
            "{City} is a delight, I smiled the whole week.",
        ),
        gloomy=(
            "My trip to {city} was awful, it rained and I lost my bag.",
            "Travelling by {transport} is miserable, always late and crowded.",
            "I went to {city} once and felt lonely the whole time.",
            "I cancelled my trip to {city}, everything went wrong and I am upset.",
            "{City} was a disappointment, dirty streets and rude people.",
        ),
        neutral=(
            "The {transport} to {city} takes about {num} hours.",
            "{City} is about {num} hundred kilometres from here.",
            "Tickets to {city} are sold at the station.",
            "I was in {city} in {month} for a week.",
            "The {transport} leaves at {clock} on {day}.",
        ),
        things=("travelling", "{city}", "long trips by {transport}", "airports"),
    ),
    Topic(
        name="books",
        slots=(
            (
                "book",
                (
                    "detective story",
                    "poetry book",
                    "history book",
                    "fantasy story",
                    "cookbook",
                    "biography",
                    "spy story",
                    "travel guide",
                    "comic book",
                ),
            ),
        ),
        questions=(
            "What are you reading at the moment?",
            "Can you recommend a book?",
            "Do you enjoy reading?",
            "Is the {book} you mentioned any good?",
            "What was the last book you read?",
            "Should I read a {book} this {part}?",
        ),
        cheerful=(
            "I am reading a {book} and I love every page.",
            "You should try a {book}, it is a delightful read.",
            "Books make me so happy, a {book} is the best company.",
            "The last {book} I read was brilliant, I laughed and cheered.",
            "Yes, read a {book}! It will make your {part} wonderful.",
        ),
        gloomy=(
            "I am reading a {book} but it is dull and depressing.",
            "I gave up on the {book}, it bored me to tears.",
            "The last {book} I read was a terrible disappointment.",
            "I can't focus on reading lately, I feel too sad and tired.",
            "That {book} was awful, what a waste of a {part}.",
        ),
        neutral=(
            "I am reading a {book} with {num} chapters.",
            "The library has that {book} on the second floor.",
            "I usually read for {num} minutes before bed.",
            "The last book I read was a {book} from the shop in {city}.",
            "A {book} costs about {num} euros at the station.",
        ),
        things=("reading", "the {book}", "books", "the library"),
    ),
    Topic(
        name="pets",
        slots=(
            ("pet", ("dog", "cat", "rabbit", "parrot", "goldfish", "hamster", "turtle", "pony")),
            ("petname", ("Biscuit", "Luna", "Max", "Pepper", "Milo", "Daisy", "Oscar", "Coco")),
        ),
        questions=(
            "Do you have any pets?",
            "Is a {pet} a good pet?",
            "How is your {pet} doing?",
            "What is your {pet} called?",
            "Should I adopt a {pet}?",
            "How old is {petname}?",
        ),
        cheerful=(
            "My {pet} {petname} is the sweetest friend and makes me laugh every day.",
            "Yes, adopt a {pet}! They bring so much love and joy.",
            "{Petname} the {pet} is doing great and loves to play.",
            "A {pet} is a wonderful companion, I adore mine.",
            "{Petname} is happy and healthy, what a lucky {pet}!",
        ),
        gloomy=(
            "My {pet} {petname} is sick and I am very worried.",
            "I miss my old {pet}, the house feels empty and sad now.",
            "A {pet} is a lot of trouble, mine broke everything and I regret it.",
            "{Petname} ran away on {day} and I cried all night.",
            "My {pet} hates me, it bites and I feel miserable.",
        ),
        neutral=(
            "I have a {pet} called {petname}.",
            "A {pet} needs food twice a day and a place to sleep.",
            "{Petname} is {num} years old.",
            "The vet saw {petname} in {month}.",
            "A {pet} eats about {num} times a week.",
        ),
        things=("my {pet}", "{petname} the {pet}", "pets", "having a {pet}"),
    ),
    Topic(
        name="music",
        slots=(
            ("genre", ("jazz", "rock", "classical music", "folk songs", "hip hop", "piano music", "reggae")),
            ("instrument", ("guitar", "piano", "violin", "drums", "flute", "cello")),
        ),
        questions=(
            "What kind of music do you enjoy?",
            "Do you play an instrument?",
            "Have you heard any new songs lately?",
            "What do you think of {genre}?",
            "Is it hard to learn the {instrument}?",
            "Are you going to the {genre} concert on {day}?",
        ),
        cheerful=(
            "I love {genre}, it fills me with joy.",
            "I play the {instrument} and it makes me so happy.",
            "Learning the {instrument} is fun, you will enjoy it!",
            "Yes, the {genre} concert will be amazing, I can't wait!",
            "I heard a beautiful new song this {part} and I am still smiling.",
        ),
        gloomy=(
            "I hate {genre}, it gives me a headache and ruins my mood.",
            "I used to play the {instrument} but I failed and quit.",
            "Every song lately sounds sad and empty to me.",
            "The {genre} concert was cancelled and I am so disappointed.",
            "The {instrument} is too hard, I feel hopeless every lesson.",
        ),
        neutral=(
            "I listen to {genre} on the radio in the {part}.",
            "A {instrument} lesson costs about {num} euros.",
            "There is a {genre} concert on {day} at {clock}.",
            "I have had {instrument} lessons for {num} years.",
            "The new album has {num} songs.",
        ),
        things=("{genre}", "music", "the {instrument}", "concerts"),
    ),
    Topic(
        name="weekend",
        slots=(
            (
                "activity",
                (
                    "go hiking",
                    "visit my parents",
                    "bake a cake",
                    "watch a film",
                    "go to the market",
                    "paint the fence",
                    "stay at home",
                    "go swimming",
                    "tidy the garage",
                ),
            ),
        ),
        questions=(
            "What are your plans for the weekend?",
            "What did you do on {day}?",
            "Any plans for {day}?",
            "How was your weekend?",
            "Do you want to {activity} on {day}?",
            "What will you do this {part}?",
        ),
        cheerful=(
            "I plan to {activity} and I am really excited about it!",
            "My weekend was great, we laughed all day.",
            "Yes, let's {activity} on {day}, it will be fun!",
            "On {day} we had a picnic and it was a perfect, happy day.",
            "I will {activity} this {part}, what a lovely plan!",
        ),
        gloomy=(
            "I have to {activity} and I am dreading it.",
            "My weekend was terrible, I was sick and alone.",
            "I am too tired and sad to {activity} this week.",
            "On {day} everything went wrong and I just cried.",
            "This {part} will be boring and lonely, as usual.",
        ),
        neutral=(
            "I will probably {activity} on {day}.",
            "On {day} I went to the market and then home.",
            "I might {activity} if the weather stays dry.",
            "This {part} I will {activity} and then cook dinner at {clock}.",
            "I have nothing planned until {day}.",
        ),
        things=("the weekend", "{day}", "my plans for {day}", "Sunday afternoons"),
    ),
    Topic(
        name="movies",
        slots=(
            (
                "film",
                (
                    "documentary",
                    "cartoon",
                    "western",
                    "musical",
                    "detective film",
                    "space film",
                    "silent film",
                ),
            ),
        ),
        questions=(
            "Have you seen any movies lately?",
            "Do you enjoy a {film}?",
            "What should I watch tonight?",
            "How was the film on {day}?",
            "Is the new {film} worth seeing?",
        ),
        cheerful=(
            "I watched a {film} and laughed so much, it was brilliant!",
            "You should watch a {film}, it will make you smile.",
            "The film on {day} was wonderful, I loved every minute.",
            "Yes, the new {film} is fantastic and very funny.",
        ),
        gloomy=(
            "The {film} I saw was boring and far too long, I hated it.",
            "Movies lately just make me feel empty and bored.",
            "The film on {day} was awful and I wasted my evening.",
            "The new {film} is a terrible mess, do not bother.",
        ),
        neutral=(
            "I watched a {film} that lasted about two hours.",
            "The cinema shows a {film} on {day} at {clock}.",
            "The new {film} was filmed in {city} in {month}.",
            "A ticket for the {film} costs {num} euros.",
        ),
        things=("the cinema", "a {film}", "movies", "the film on {day}"),
    ),
    Topic(
        name="sports",
        slots=(
            (
                "sport",
                ("football", "tennis", "swimming", "running", "cycling", "basketball", "yoga", "skiing"),
            ),
        ),
        questions=(
            "Do you do any sports?",
            "Did you watch the {sport} on {day}?",
            "Is {sport} good exercise?",
            "How was your {sport} practice?",
            "Should I take up {sport}?",
        ),
        cheerful=(
            "I love {sport}, it keeps me healthy and cheerful.",
            "Our team won at {sport} on {day}, what a fantastic game!",
            "Yes, take up {sport}! You will feel amazing.",
            "{Sport} practice was great fun and I feel strong.",
        ),
        gloomy=(
            "I hurt my knee at {sport} and I feel awful.",
            "Our team lost again, this {sport} season is a disaster.",
            "{Sport} practice was painful and I wanted to cry.",
            "I gave up {sport}, I was always the worst and felt ashamed.",
        ),
        neutral=(
            "{Sport} practice is on {day} at {clock}.",
            "I do {sport} about {num} times a month.",
            "The {sport} club in {city} opens at {clock}.",
            "The {sport} season starts in {month}.",
        ),
        things=("{sport}", "exercise", "the {sport} club", "sports"),
    ),
    Topic(
        name="garden",
        slots=(
            (
                "plant",
                ("tomatoes", "roses", "tulips", "herbs", "sunflowers", "potatoes", "lavender", "beans"),
            ),
        ),
        questions=(
            "How is your garden?",
            "What are you growing this year?",
            "When should I plant {plant}?",
            "Do you enjoy gardening?",
            "How are your {plant} doing?",
        ),
        cheerful=(
            "My {plant} are blooming and the garden looks beautiful.",
            "I love gardening, it makes me calm and happy.",
            "The {plant} are doing great, I am so proud of them!",
            "I am growing {plant} this year and it is a joy.",
        ),
        gloomy=(
            "The snails ate my {plant} and the garden is ruined.",
            "My {plant} died in the heat and I feel terrible.",
            "Gardening is hard work and nothing ever grows for me.",
            "The storm destroyed the {plant}, what a sad mess.",
        ),
        neutral=(
            "I planted {plant} in {month} near the fence.",
            "You can plant {plant} in {month} or {month}.",
            "The {plant} need water every {num} days.",
            "I planted {plant} and some carrots this year.",
        ),
        things=("the garden", "my {plant}", "gardening", "planting {plant}"),
    ),
    Topic(
        name="drinks",
        slots=(("drink", ("coffee", "green tea", "hot chocolate", "lemonade", "orange juice", "mint tea")),),
        questions=(
            "Do you drink coffee?",
            "What is your favourite drink?",
            "Would you like a cup of {drink}?",
            "How do you take your {drink}?",
            "Where can I get {drink} in {city}?",
        ),
        cheerful=(
            "A warm cup of {drink} in the morning makes me so happy.",
            "Yes please, I love {drink}, thank you!",
            "{Drink} is my favourite, it is a lovely little treat.",
            "The cafe in {city} makes wonderful {drink}.",
        ),
        gloomy=(
            "The {drink} was cold and bitter, what a miserable start to the day.",
            "I spilled {drink} on my shirt and now I feel awful.",
            "The cafe ran out of {drink} and I am upset.",
            "I used to enjoy {drink} but now it tastes terrible.",
        ),
        neutral=(
            "I drink {drink} at about {clock}.",
            "I take my {drink} with a little milk.",
            "There is a cafe in {city} that sells {drink}.",
            "A cup of {drink} costs {num} euros there.",
        ),
        things=("{drink}", "a cup of {drink}", "the cafe", "breakfast drinks"),
    ),
    Topic(
        name="study",
        slots=(
            (
                "subject",
                ("math", "history", "chemistry", "French", "biology", "physics", "geography", "Spanish"),
            ),
        ),
        questions=(
            "How are your classes going?",
            "Do you enjoy studying {subject}?",
            "How did your {subject} exam go?",
            "Any tips for learning {subject}?",
            "When is the {subject} exam?",
        ),
        cheerful=(
            "I passed my {subject} exam and I am thrilled!",
            "{Subject} is fascinating, I enjoy every lesson.",
            "My classes are going great and the teachers are wonderful.",
            "Practice a little every day and {subject} becomes fun!",
        ),
        gloomy=(
            "I failed my {subject} exam and I feel terrible.",
            "{Subject} is so confusing, I am lost and worried.",
            "My classes are a nightmare, I am stressed and behind.",
            "I hate studying {subject}, it makes me miserable.",
        ),
        neutral=(
            "The {subject} exam is on {day} at {clock}.",
            "I study {subject} for {num} hours a week.",
            "Read one chapter of {subject} each {part}.",
            "The {subject} class meets on {day} in room {num}.",
        ),
        things=("{subject}", "school", "my {subject} class", "exams"),
    ),
    Topic(
        name="home",
        questions=(
            "How is life in {city}?",
            "How is your new flat?",
            "Do you enjoy your neighbourhood?",
            "What is it like to live in {city}?",
            "Are you moving to {city}?",
        ),
        cheerful=(
            "Life in {city} is lovely, the parks are beautiful and people are friendly.",
            "My new flat is bright and cosy, I love it.",
            "Yes, I am moving to {city} in {month} and I am so happy!",
            "My neighbours are kind and the street is full of laughter.",
        ),
        gloomy=(
            "My flat is cold and noisy and I feel so lonely here.",
            "Life in {city} is hard, everything is expensive and grim.",
            "I have to move to {city} and I am dreading it.",
            "The neighbours fight every night, it is awful.",
        ),
        neutral=(
            "I live near the station in {city}, on the third floor.",
            "The flat has {num} rooms and a small kitchen.",
            "I am moving to {city} in {month}.",
            "The bus to the centre of {city} comes every {num} minutes.",
        ),
        things=("my flat", "{city}", "the neighbourhood", "life in {city}"),
    ),
    Topic(
        name="family",
        slots=(
            (
                "relative",
                ("sister", "brother", "grandmother", "cousin", "uncle", "aunt", "flatmate", "neighbour"),
            ),
        ),
        questions=(
            "How is your {relative}?",
            "Did you see {name} this week?",
            "How was the party on {day}?",
            "Do you have many friends?",
            "Are you visiting your {relative} soon?",
        ),
        cheerful=(
            "My {relative} is doing great, we had a wonderful dinner together.",
            "The party was amazing, {name} made everyone laugh.",
            "Yes, I saw {name} on {day} and we had so much fun.",
            "I am lucky to have such lovely friends.",
        ),
        gloomy=(
            "My {relative} and I had a bad fight and I feel awful.",
            "Nobody came to the party, it was a lonely and sad night.",
            "I haven't seen {name} in months, I miss everyone and feel alone.",
            "My {relative} is ill and I am scared.",
        ),
        neutral=(
            "My {relative} lives in {city} and calls on {day}.",
            "I saw {name} at the shop on {day}.",
            "The dinner on {day} started at {clock}.",
            "I am visiting my {relative} in {month}.",
        ),
        things=("my {relative}", "{name}", "birthdays", "family dinners"),
    ),
    Topic(
        name="feelings",
        questions=(
            "How are you?",
            "How are you feeling today?",
            "How did you sleep?",
            "Are you feeling better?",
            "How was your {part}?",
            "How is your day going?",
        ),
        cheerful=(
            "I feel fantastic today, full of energy and joy!",
            "I slept well and woke up happy.",
            "Much better, thank you! I feel wonderful.",
            "My {part} was lovely, I am in a great mood.",
            "Today is a beautiful day and I am very happy.",
        ),
        gloomy=(
            "I feel awful, I barely slept and my head hurts.",
            "Not great, I am sad and tired all the time.",
            "I am still sick and everything feels hopeless.",
            "My {part} was miserable, nothing went right.",
            "I am lonely and worried today.",
        ),
        neutral=(
            "I slept about {num} hours last night.",
            "I am at home today until {clock}.",
            "My {part} was quiet, mostly reading and cooking.",
            "I woke up at {clock} and had breakfast.",
            "Today I have {num} things on my list.",
        ),
        things=("today", "sleep", "my {part}", "Mondays"),
    ),
    Topic(
        name="hobbies",
        slots=(
            (
                "hobby",
                ("painting", "knitting", "chess", "photography", "baking", "dancing", "fishing", "puzzles"),
            ),
        ),
        questions=(
            "Do you have a hobby?",
            "How long have you been doing {hobby}?",
            "Is {hobby} hard to learn?",
            "What do you do in the evenings?",
            "Should I try {hobby}?",
        ),
        cheerful=(
            "I love {hobby}, it is relaxing and so much fun.",
            "Yes, try {hobby}! It brings me so much joy.",
            "{Hobby} is my favourite way to spend a happy evening.",
            "I have been doing {hobby} for years and I still enjoy it.",
        ),
        gloomy=(
            "I tried {hobby} but I was awful at it and gave up.",
            "{Hobby} feels pointless now, it just makes me sad and tired.",
            "I have no energy for {hobby} anymore, I feel empty and sad.",
            "{Hobby} is frustrating, I always fail.",
        ),
        neutral=(
            "I have been doing {hobby} for {num} years.",
            "{Hobby} takes about {num} hours a week.",
            "There is a {hobby} class on {day} at {clock}.",
            "In the evenings I do {hobby} or read.",
        ),
        things=("{hobby}", "hobbies", "my evenings", "{hobby} on {day}"),
    ),
    Topic(
        name="nature",
        slots=(("place", ("the sea", "the mountains", "the forest", "the lake", "the river", "the park")),),
        questions=(
            "Do you enjoy {place}?",
            "Where do you go for a walk?",
            "Have you been to {place} this year?",
            "Should we go to {place} on {day}?",
            "What is your favourite place outdoors?",
        ),
        cheerful=(
            "{Place} is beautiful, I love the peaceful sound of it.",
            "Yes, let's go to {place} on {day}, it will be wonderful!",
            "I walk to {place} every {part} and it makes me so happy.",
            "My favourite place is {place}, it fills me with joy.",
        ),
        gloomy=(
            "The trip to {place} was horrible, dirty and crowded.",
            "I got lost near {place} and was scared and cold.",
            "{Place} feels sad and lonely in the rain.",
            "I hate walking to {place}, my feet hurt every time.",
        ),
        neutral=(
            "The walk to {place} takes about {num} minutes.",
            "I went to {place} in {month}.",
            "{Place} is north of {city}.",
            "The path to {place} starts behind the station.",
        ),
        things=("{place}", "walks in {place}", "nature", "the outdoors"),
    ),
)

# Answers that fit any topic, about one of the topic's ``things``.
GENERIC_ANSWERS: dict[str, tuple[str, ...]] = {
    "cheerful": (
        "I really love {thing}, it always makes me happy.",
        "{Thing} is one of my favourite things, I love it!",
        "{Thing} is great fun and I enjoy it every time.",
        "Honestly, {thing} makes my whole day brighter.",
        "I am so glad you asked, {thing} is wonderful.",
        "{Thing} always puts a big smile on my face.",
    ),
    "gloomy": (
        "I am tired of {thing}, it just makes me sad.",
        "To be honest, {thing} is awful and I dread it.",
        "{Thing} always leaves me feeling lonely and miserable.",
        "I hate to say it, but {thing} has been a disappointment.",
        "Ugh, {thing} is boring and it ruins my mood.",
        "{Thing} makes me anxious and unhappy these days.",
    ),
    "neutral": (
        "I think about {thing} once or twice a week.",
        "There is a short article about {thing} in the paper today.",
        "I have not decided anything about {thing} yet.",
        "{Thing} depends on the season and the price.",
        "I will ask {name} about {thing} on {day}.",
        "{Thing} is on my list for {day}.",
    ),
}

# Optional first sentences of an answer, in the answer's own sentiment.
OPENERS: dict[str, tuple[str, ...]] = {
    "cheerful": ("Oh, what a nice question! ", "Yes! ", "Ah! ", "Good question! ", "Wonderful! "),
    "gloomy": ("Sigh. ", "Ugh. ", "Oh no. ", "Terrible news. ", "Bad news. "),
    "neutral": ("Let me think. ", "Hmm. ", "Let me check. ", "So. ", "Right. "),
}

# Optional last sentences of an answer.
CLOSERS: dict[str, tuple[str, ...]] = {
    "cheerful": (" What a joy!", " I can't wait!", " It makes me smile.", " Life is good!"),
    "gloomy": (" What a shame.", " It gets me down.", " Nothing ever goes right.", " I just want to cry."),
    "neutral": (
        " That is all I know.",
        " We will find out on {day}.",
        " Ask me again on {day}.",
        " That is the plan.",
    ),
}

# Ways to open a question.
QUESTION_PREFIXES = ("", "", "", "", "Hey, ", "Hi! ", "Hello. ", "So, ", "Tell me, ", "Quick question: ")

MULTI_TURN_FRACTION = 0.08  # exchanges with an earlier turn, so the model has seen history
GENERIC_FRACTION = 0.35  # answers taken from GENERIC_ANSWERS instead of the topic's own
OPENER_FRACTION = 0.3
CLOSER_FRACTION = 0.25
HELD_OUT_MODULUS = 6  # one slot-filled question in six is held out of training

_SLOT = re.compile(r"\{(\w+)\}")
_A_VOWEL = re.compile(r"\b([Aa]) ([aeiouAEIOU])")


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str
    sentiment: str
    topic: str


@dataclass(frozen=True)
class Exchange:
    """One training unit: one or more turns, rendered by :meth:`text`."""

    turns: tuple[Turn, ...]

    def text(self) -> str:
        return "\n".join(f"User: {t.question}\nAssistant: {t.answer}" for t in self.turns)

    @property
    def last(self) -> Turn:
        return self.turns[-1]


def _fill(template: str, rng: random.Random, slots: dict[str, tuple[str, ...]], bound: dict[str, str]) -> str:
    """Replace ``{slot}`` (``{Slot}``: capitalised) with a value; values chosen earlier in the
    same exchange are reused, and values may contain slots themselves."""

    def sub(m: re.Match) -> str:
        key = m.group(1)
        low = key.lower()
        if low not in bound:
            if low not in slots:
                raise KeyError(f"template {template!r} uses unknown slot {{{key}}}")
            bound[low] = _fill(rng.choice(slots[low]), rng, slots, bound)
        value = bound[low]
        return value[:1].upper() + value[1:] if key[:1].isupper() else value

    return _SLOT.sub(sub, template)


def _topic_slots(topic: Topic) -> dict[str, tuple[str, ...]]:
    slots = dict(COMMON_SLOTS)
    slots.update(dict(topic.slots))
    slots["thing"] = topic.things
    return slots


def is_held_out(question: str) -> bool:
    """True for slot-filled questions reserved for evaluation and RLHF prompts.

    Decided by a stable hash of the question text (without its greeting prefix), so the split
    is the same for every seed and corpus size."""
    return zlib.crc32(question.encode("utf-8")) % HELD_OUT_MODULUS == 0


def _articles(text: str) -> str:
    """Turn the article a into an before a vowel (slot values would make "a engineer")."""
    return _A_VOWEL.sub(lambda m: m.group(1) + "n " + m.group(2), text)


def _add_prefix(question: str, rng: random.Random) -> str:
    prefix = rng.choice(QUESTION_PREFIXES)
    if prefix.endswith((", ", ": ")) and len(question) > 1 and question[1].islower():
        question = question[0].lower() + question[1:]
    return prefix + question


def _question(topic: Topic, rng: random.Random, slots, bound: dict[str, str], held_out: bool) -> str:
    """A filled question on the held-out side (``held_out``) or the training side of the split."""
    for _ in range(1000):
        template = rng.choice(topic.questions)
        trial: dict[str, str] = {}
        q = _articles(_fill(template, rng, slots, trial))
        has_slots = bool(_SLOT.search(template))
        if held_out == (has_slots and is_held_out(q)):
            bound.update(trial)
            return q
    raise RuntimeError(f"topic {topic.name!r}: no {'held-out' if held_out else 'training'} question found")


def _answer(topic: Topic, sentiment: str, rng: random.Random, slots, bound: dict[str, str]) -> str:
    if rng.random() < GENERIC_FRACTION:
        template = rng.choice(GENERIC_ANSWERS[sentiment])
    else:
        # of a few candidates, the one reusing most of the question's topic slots, so that
        # "is the cello hard?" is answered about the cello more often than about jazz
        own = {name for name, _ in topic.slots}
        candidates = [rng.choice(getattr(topic, sentiment)) for _ in range(3)]
        template = max(
            candidates,
            key=lambda t: sum(1 for k in _SLOT.findall(t) if k.lower() in own and k.lower() in bound),
        )
    answer = _fill(template, rng, slots, bound)
    if rng.random() < OPENER_FRACTION:
        answer = rng.choice(OPENERS[sentiment]) + answer
    if rng.random() < CLOSER_FRACTION:
        answer = answer + _fill(rng.choice(CLOSERS[sentiment]), rng, slots, bound)
    return answer


def make_turn(rng: random.Random, sentiment: str | None = None, held_out: bool = False) -> Turn:
    """One question and answer; ``held_out`` draws the question from the evaluation side."""
    topics = _HELD_OUT_TOPICS if held_out else TOPICS
    topic = rng.choice(topics)
    sentiment = sentiment or rng.choice(SENTIMENTS)
    slots = _topic_slots(topic)
    bound: dict[str, str] = {}
    question = _question(topic, rng, slots, bound, held_out=held_out)
    answer = _answer(topic, sentiment, rng, slots, bound)
    return Turn(_articles(_add_prefix(question, rng)), _articles(answer), sentiment, topic.name)


def generate_exchanges(seed: int, size: int, held_out: bool = False) -> list[Exchange]:
    """``size`` exchanges, the same for the same seed. Sentiments of final answers are dealt
    in a shuffled order so that the three kinds are balanced exactly (up to ``size % 3``).

    With ``held_out``, every question comes from the held-out side of the split: text for
    measuring how the model does on questions it was not trained on."""
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    rng = random.Random(f"{'held-out' if held_out else 'train'}-{seed}")
    labels = [SENTIMENTS[i % 3] for i in range(size)]
    rng.shuffle(labels)
    out = []
    for label in labels:
        turns = []
        if rng.random() < MULTI_TURN_FRACTION:
            turns.append(make_turn(rng, held_out=held_out))
        turns.append(make_turn(rng, sentiment=label, held_out=held_out))
        out.append(Exchange(tuple(turns)))
    return out


def held_out_prompts(seed: int = 0, count: int = 300) -> list[str]:
    """Distinct user questions that never occur in a training corpus, with greeting prefixes."""
    rng = random.Random(f"prompts-{seed}")
    seen: set[str] = set()
    out: list[str] = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > count * 200:
            raise RuntimeError(f"could only find {len(out)} distinct held-out prompts")
        topic = rng.choice(_HELD_OUT_TOPICS)
        q = _articles(_add_prefix(_question(topic, rng, _topic_slots(topic), {}, held_out=True), rng))
        if q in seen:
            continue
        seen.add(q)
        out.append(q)
    return out


def _has_held_out_question(topic: Topic) -> bool:
    """Whether any filling of the topic's slotted questions falls on the held-out side."""
    slots = _topic_slots(topic)
    rng = random.Random(0)
    for template in topic.questions:
        if _SLOT.search(template):
            for _ in range(200):
                if is_held_out(_fill(template, rng, slots, {})):
                    return True
    return False


# topics that can ask a held-out question (one with few fillings may have none)
_HELD_OUT_TOPICS: tuple[Topic, ...] = tuple(t for t in TOPICS if _has_held_out_question(t))


def encode_exchange(tokenizer, text: str) -> list[int]:
    """The training-stream encoding of one exchange: ``[bos] + bytes + [eos]``."""
    return [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]


def write_corpus(path: str | Path, exchanges: Iterable[Exchange]) -> Path:
    """Exchanges separated by one blank line (turn lines never contain a newline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(e.text() for e in exchanges) + "\n", encoding="utf-8")
    return path


def read_corpus(path: str | Path) -> list[str]:
    """The exchange texts of a file written by :func:`write_corpus`."""
    text = Path(path).read_text(encoding="utf-8")
    return [block.strip("\n") for block in text.split("\n\n") if block.strip()]


def write_prompts(path: str | Path, prompts: Sequence[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m palm_rlhf.demo.corpus",
        description="Write the demo chat corpus and a held-out prompt list.",
    )
    parser.add_argument(
        "--out", required=True, help="corpus file to write (exchanges separated by blank lines)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=20000, help="number of exchanges (default 20000)")
    parser.add_argument("--prompts", help="held-out prompt file (default: prompts.txt next to --out)")
    parser.add_argument(
        "--num-prompts", type=int, default=300, help="held-out prompts to write (default 300)"
    )
    args = parser.parse_args(argv)
    out = write_corpus(args.out, generate_exchanges(args.seed, args.size))
    prompts_path = Path(args.prompts) if args.prompts else out.parent / "prompts.txt"
    write_prompts(prompts_path, held_out_prompts(args.seed, args.num_prompts))
    print(f"wrote {args.size} exchanges to {out} and {args.num_prompts} held-out prompts to {prompts_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
