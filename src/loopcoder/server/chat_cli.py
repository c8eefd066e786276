"""`loopcoder chat`: a terminal conversation that streams each reply as it is generated.

It drives the engine directly (one request at a time, no server needed) and keeps the
conversation so each turn sees the earlier ones; `/reset` starts over, `/exit` or Ctrl-D quits,
Ctrl-C stops the reply being written.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from loopcoder.engine.engine import LLMEngine
from loopcoder.sampling import SamplingParams

HELP = "Type a message. /reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply."


class ChatSession:
    def __init__(self, engine: LLMEngine, args: argparse.Namespace, out: TextIO | None = None) -> None:
        if engine.tokenizer is None or engine.tokenizer.chat_template is None:
            raise ValueError("this checkpoint has no chat template: use `loopcoder generate`")
        self.engine, self.args, self.out = engine, args, out or sys.stdout
        self.start = [{"role": "system", "content": args.system}] if args.system else []
        self.history = list(self.start)

    def handle(self, line: str) -> bool:
        """Act on one line of input; False when the user wants to quit."""
        command = line.strip()
        if command in ("/exit", "/quit"):
            return False
        if command == "/reset":
            self.history = list(self.start)
            print("(conversation cleared)", file=self.out)
        elif command:
            self.history.append({"role": "user", "content": line})
            reply = self.reply()
            if reply is None:
                self.history.pop()
            else:
                self.history.append({"role": "assistant", "content": reply})
        return True

    def reply(self) -> str | None:
        """Generate and stream the assistant's answer to the history; None if it cannot fit."""
        ids = self.engine.tokenizer.apply_chat_template(self.history, add_generation_prompt=True, tokenize=True)
        room = self.engine.max_model_len - len(ids)
        if room < 1:
            print("error: the conversation no longer fits in the context; /reset to start over", file=sys.stderr)
            return None
        max_tokens = min(self.args.max_tokens or room, room)
        params = SamplingParams(temperature=self.args.temperature, top_p=self.args.top_p, max_tokens=max_tokens, seed=self.args.seed)
        request_id = self.engine.add_request({"prompt_token_ids": ids}, params)
        text = ""
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.request_id == request_id:
                        new = out.outputs[0].text
                        self.out.write(new[len(text) :])
                        self.out.flush()
                        text = new
        except KeyboardInterrupt:
            self.engine.abort(request_id)
        print(file=self.out)
        return text


def run_chat(args: argparse.Namespace) -> int:
    from loopcoder.server.loading import load_engine, model_arg

    session = ChatSession(load_engine(model_arg(args), args, max_num_seqs=1), args)
    print(HELP, file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if not session.handle(line):
            return 0
