"""The supervised tree of docs/actors.md, runnable: ``python docs/example_tree.py``."""

import msgspec
import trio

from actors import Actor, ReplyError, Request, open_actor_system
from supervisors import ONE_FOR_ONE, ChildSpec, Supervisor, which_children


class Deposit(msgspec.Struct, frozen=True, tag=True):
    amount: int


class Balance(Request[int], frozen=True, tag=True):
    pass


class Withdraw(Request[int], frozen=True, tag=True):
    amount: int


class InsufficientFunds(ReplyError):
    """A declared error: it goes back to the caller, the actor keeps running."""


class Account(Actor):
    def __init__(self, opening: int) -> None:
        self.balance = opening

    async def on_deposit(self, msg: Deposit) -> None:
        if msg.amount < 0:
            raise ValueError("negative deposit")  # a crash: the supervisor restarts us
        self.balance += msg.amount

    async def on_withdraw(self, msg: Withdraw) -> int:
        if msg.amount > self.balance:
            raise InsufficientFunds(f"balance is {self.balance}")
        self.balance -= msg.amount
        return self.balance

    async def on_balance(self, msg: Balance) -> int:
        return self.balance


async def main() -> None:
    async with open_actor_system("bank") as system:
        bank = await system.spawn(
            Supervisor(
                [
                    ChildSpec("alice", Account, (100,)),
                    ChildSpec("bob", Account, (5,)),
                ],
                strategy=ONE_FOR_ONE,
                intensity=3,
                period=5.0,
            ),
            "bank",
        )
        alice = system.lookup("/bank/alice")
        await alice.cast(Deposit(50))
        assert await alice.call(Balance()) == 150
        try:
            await alice.call(Withdraw(1000))
        except InsufficientFunds as exc:
            print("refused:", exc)
        await alice.cast(Deposit(-1))  # crashes alice; she restarts with her opening balance
        assert await alice.call(Balance()) == 100  # the same ref works after the restart
        print([child.id for child in await which_children(bank)])
        print(system.dump())


if __name__ == "__main__":
    trio.run(main)
