-- answer_for(message_id) finds the run that answered a message through message_ids
-- (message_ids @> ARRAY[id]). Not partial on status = 'succeeded': a predicate column would make
-- every status change of a run a non-HOT update.
CREATE INDEX runs_message_ids ON runs USING gin (message_ids);
