"""The AUSteer authors' prompt templates, verbatim from the data README.

They are filled with :meth:`str.format`; braces inside the filled-in values are
left alone, so benchmark text needs no escaping.
"""

from __future__ import annotations

COPA = ("Question:\n{premise} Based on the previous passage, choose the most reasonable "
        "{question}.\nA:{choice1}\nB:{choice2}\n\nAnswer:\n")

BOOLQ = ("Is the answer to the question encapsulated in the passage? Please confirm with "
         "'yes' or 'no'.\n\nPassage: {passage}\n\nQuestion: {question}\n\nAnswer:")

WINOGRANDE = ("Please fill in the blanks. Write A or B as the answer.\n\nSentence: {sentence}"
              "\nA. {option1}\nB. {option2}\nAnswer:")

SVAMP = ("Answer the following grade-school math word problem. Reply with only the final "
         "answer as a number.\nQuestion: {Body} {Question}\nAnswer:")

MAWPS = ("Answer the grade school math word problem below, using step-by-step "
         "problem-solving process. Print the final answer after \"####\".\nQuestion: "
         "{question}\nAnswer:")
